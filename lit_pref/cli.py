"""``lit-pref``: the LightningCLI entry point (``lit-pref fit --config configs/dpo.yaml``).

Every error the user can fix is one line on stderr (``lit-pref: error: …``) and exit code 2
(3 when training diverged, 143 / 130 when stopped by SIGTERM / Ctrl-C after saving a checkpoint):
configuration errors name the argument, the value and what is allowed (with "did you mean" for
a near miss); paths that cannot be loaded fail before anything is loaded; directories written
at the end of training are checked before it starts. ``LIT_PREF_DEBUG=1`` raises instead, with
the full traceback and jsonargparse's whole message.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import re
import sys
import tempfile
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_pref.callbacks.faults import TrainingDiverged, say
from lit_pref.data.datamodule import PreferenceDataModule, file_builder
from lit_pref.data.sources import (
    check_source,
    looks_local,
    missing_path_message,
    model_in_cache,
    nearest_existing,
)
from lit_pref.modules.base import AlignmentModule
from lit_pref.resume import checkpoint_dirs, continued_logger, find_last_checkpoint, run_identity, saved_run

# Module arguments that name a model or tokenizer to load (a local path or a hub id).
MODEL_SOURCES = ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path")
# jsonargparse's wrappers around the error that matters.
WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path", 'Parser key "')


class ConfigError(ValueError):
    """A configuration the parser rejected, explained in one line."""


def _model_tokenizer(model_name_or_path: str | None, tokenizer_name_or_path: str | None) -> str | None:
    """The tokenizer the model uses: its own ``tokenizer_name_or_path``, else the model path."""
    return tokenizer_name_or_path or model_name_or_path


# ----------------------------------------------------------- explaining errors
def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes, each message once (jsonargparse re-raises one message as several types)."""
    chain = [error]
    cause = error.__cause__
    while cause is not None and len(chain) < 50:
        if str(cause) == str(chain[-1]):
            chain[-1] = cause
        else:
            chain.append(cause)
        cause = cause.__cause__
    return chain


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def init_parameters(cls: Any) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the base classes."""
    names: list[str] = []
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _option_strings(parser: Any) -> list[str]:
    names = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    subcommands = getattr(parser, "_subcommands_action", None)
    for subparser in getattr(subcommands, "_name_parser_map", {}).values():
        names += _option_strings(subparser)
    return names


def _did_you_mean(word: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _allowed(subtypes: str) -> tuple[str, list[str]]:
    """("one of a, b or null", [choices]) from jsonargparse's ``Subtypes: [...]`` or ``Expected a ...`` text."""
    choices: list[str] = []
    kinds: list[str] = []
    for literal, cls in re.findall(r"typing\.Literal\[(.*?)\](?=,|\]|$)|<class '([\w.]+)'>", subtypes):
        if literal:
            try:
                values = ast.literal_eval(f"({literal},)")
            except (ValueError, SyntaxError):
                continue
            choices += [str(v) for v in values if str(v) not in choices]
        elif cls == "NoneType":
            kinds.append("null")
        elif cls not in kinds:
            kinds.append(cls)
    parts = ([f"one of {', '.join(choices)}"] if choices else []) + [k if k == "null" else _article(k) for k in kinds]
    return " or ".join(parts) or subtypes.strip(), choices


def explain_argument_error(error: BaseException, parser: Any = None) -> str:
    """One line for a jsonargparse error: the argument, the value and what is allowed."""
    chain = _chain(error)
    messages = [str(e) for e in chain]
    keys: list[str] = []
    class_path: str | None = None
    union: str | None = None
    for message in messages:
        first = message.lstrip().splitlines()[0] if message.strip() else ""
        parser_key = re.match(r'Parser key "([^"]+)":', first)
        if parser_key:
            keys.append(parser_key.group(1))
            union = None
        named = re.search(r"class_path[=' ]+'([\w.]+)'", message)
        if named:
            class_path = named.group(1)
        if message.startswith("Does not validate against any of the Union subtypes"):
            subtypes = re.search(r"^Subtypes: (.*)$", message, re.MULTILINE)
            union = subtypes.group(1) if subtypes else None
    key = ".".join(keys)
    lead = f"{key}: " if key else ""
    leaf = chain[-1]
    text = " ".join(str(leaf).split())

    unknown = re.match(r"unrecognized arguments: (\S+)", text)
    if unknown:
        option = unknown.group(1).split("=", 1)[0]
        candidates = _option_strings(parser) if parser is not None else []
        return f"unknown argument {option}" + (
            _did_you_mean(option, candidates) or "; see `lit-pref fit --help` for the accepted ones"
        )
    option = re.match(r"Subcommand '\w+' does not accept option '([^']+)'", text)
    if option:  # a mistyped key in a config file
        name = option.group(1)
        candidates = [o.removeprefix("--") for o in _option_strings(parser)] if parser is not None else []
        return f"{name}: no such argument" + (
            _did_you_mean(name, candidates) or "; see `lit-pref fit --help` for the accepted ones"
        )
    option = re.match(r"Option '([^']+)' is not accepted", text)
    if option:
        name = option.group(1)
        owner = _import(class_path) if class_path else None
        where = f" of {class_path}" if class_path else ""
        hint = _did_you_mean(name, init_parameters(owner), prefix=f"{key}.") if owner else ""
        return f"{key}.{name}: no such argument{where}" + (hint or f"; see `lit-pref fit --{key}.help {class_path}`")
    expected = re.match(r"Expected an? (.+?)\. Got value: (.*)$", text)
    if expected:
        allowed, choices = _allowed(union or expected.group(1))
        value = expected.group(2)
        return f"{lead}got {value!r}, expected {allowed}" + _did_you_mean(value, choices)
    missing = re.match(r"module '([\w.]+)' has no attribute '(\w+)'", text)
    if missing:
        module, name = missing.groups()
        names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
        return f"{lead}{module}.{name} does not exist" + _did_you_mean(name, names, prefix=f"{module}.")
    for message in reversed(messages):  # the innermost message that is not only a wrapper
        line = " ".join(message.split())
        if line and not line.startswith(WRAPPERS):
            return f"{lead}{line}"
    return " ".join(str(error).split())


def original_error(error: BaseException) -> BaseException:
    """The error a module or data module raised, out of jsonargparse's wrappers around it."""
    for candidate in _chain(error):
        if not str(candidate).lstrip().startswith(WRAPPERS):
            return candidate
    return error


# --------------------------------------------------------------- early checks
def check_writable(directory: str, what: str) -> None:
    """Raise unless ``directory`` exists as a writable directory or can be created as one."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {directory!r} is a file, not a directory")
    found = nearest_existing(path.absolute())
    if found is None or not found.is_dir():
        raise NotADirectoryError(f"{what} {directory!r} cannot be created: {found} is a file, not a directory")
    try:
        # Creating a file, not os.access: access() says yes to root on a read-only filesystem.
        with tempfile.TemporaryFile(dir=found):
            pass
    except OSError as error:
        raise PermissionError(
            f"{what} {directory!r} cannot be written: {found} refuses new files ({error.strerror})"
        ) from None


def check_model_sources(init_args: Any) -> None:
    """Fail fast on a model / tokenizer / reference path that cannot be loaded (see ``check_source``)."""
    for name in MODEL_SOURCES:
        value = init_args.get(name) if init_args is not None else None
        if isinstance(value, str) and value:
            check_source(value, f"model.{name}", cached=not looks_local(value) and model_in_cache(value))


def check_dataset_source(value: Any) -> None:
    """A dataset path that cannot exist fails now rather than after the model has loaded."""
    if isinstance(value, str) and ":" not in value:
        if file_builder(value) and not Path(value).expanduser().exists():
            raise FileNotFoundError(missing_path_message("data file", value))
        check_source(value, "data file" if file_builder(value) else "data.dataset", cached=True)


class LitPrefCLI(LightningCLI):
    """LightningCLI with the tokenizer written once (the data module's follows the model's),
    errors raised as one-line exceptions instead of usage text, and early checks of what a run
    reads and writes."""

    def init_parser(self, **kwargs: Any) -> Any:
        # Raise instead of printing the whole usage before the error; main() explains it.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments(
            ("model.init_args.model_name_or_path", "model.init_args.tokenizer_name_or_path"),
            "data.tokenizer_name_or_path",
            compute_fn=_model_tokenizer,
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise ConfigError(explain_argument_error(error, parser)) from error

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        model = config.get("model")
        if model is not None:
            check_model_sources(model.get("init_args"))
        data = config.get("data")
        if data is not None:
            check_dataset_source(data.get("dataset"))

    def before_fit(self) -> None:
        output_dir = getattr(self.model, "output_dir", None)
        if isinstance(output_dir, str):
            check_writable(output_dir, "model.output_dir")
        for callback in self.trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath is not None:
                check_writable(str(dirpath), f"{type(callback).__name__} dirpath")
        self.warn_single_process()
        self.model.run_identity = run_identity(self.identity_config())
        if self.config_init[str(self.subcommand)].get("ckpt_path") == "last":
            try:
                path = find_last_checkpoint(checkpoint_dirs(self.trainer), self.model.run_identity)
            except FileNotFoundError as error:
                raise ConfigError(str(error)) from None
            rank_zero_info(f"resuming {path}")
            self.config_init[str(self.subcommand)]["ckpt_path"] = str(path)
        ckpt_path = self.config_init[str(self.subcommand)].get("ckpt_path")
        if ckpt_path is not None and Path(ckpt_path).is_file():
            self.continue_logs(saved_run(ckpt_path))

    def continue_logs(self, saved: dict[str, Any]) -> None:
        """Resumed, log into the checkpointed run's CSV log, its rows from the checkpoint's step on
        dropped (the killed run logged them; the resumed run logs them again). Other loggers start
        a new version."""
        configured = self.config[str(self.subcommand)].get("trainer", {}).get("logger")
        entries = configured if isinstance(configured, list) else [configured]
        if not saved.get("loggers") or len(entries) != len(self.trainer.loggers):
            return
        loggers = list(self.trainer.loggers)
        for i, entry in enumerate(entries):
            cls = _import(entry.class_path) if hasattr(entry, "class_path") else None
            if isinstance(cls, type):
                init_args = _plain(entry.get("init_args")) or {}
                loggers[i] = continued_logger(cls, init_args, saved["loggers"], saved["global_step"]) or loggers[i]
        self.trainer.loggers = loggers

    def identity_config(self) -> dict[str, Any]:
        """What makes a run this run: the model, the data and the seed (not the trainer: a resume
        may raise max_steps or change devices)."""
        config = self.config[str(self.subcommand)]
        return {key: _plain(config.get(key)) for key in ("model", "data", "seed_everything")}

    def warn_single_process(self) -> None:
        """Say so when a distributed strategy resolves to one process (``devices: auto`` on a CPU)."""
        from lightning.pytorch.strategies import (
            DDPStrategy,
            DeepSpeedStrategy,
            FSDPStrategy,
            ModelParallelStrategy,
        )

        strategy = self.trainer.strategy
        if self.trainer.world_size != 1 or not isinstance(
            strategy, DDPStrategy | FSDPStrategy | ModelParallelStrategy | DeepSpeedStrategy
        ):
            return
        accelerator = type(self.trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        rank_zero_warn(
            f"strategy {type(strategy).__name__} runs one process here ({accelerator}, "
            f"devices={self.trainer.num_devices}, num_nodes={self.trainer.num_nodes}): nothing runs in parallel; "
            "pass --trainer.devices N for N processes (on CPU: gloo, N processes on this machine)"
        )


def _plain(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else value


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a configuration or data error is one readable line, not a traceback.

    The console is quiet (:mod:`lit_pref.console`): one progress bar per phase, known
    third-party warnings off. Set ``LIT_PREF_DEBUG=1`` to see the full traceback instead, and
    every warning and progress bar.
    """
    # The command's console, not LitPrefCLI's: code that builds a LitPrefCLI itself keeps its own.
    from lit_pref.console import Trainer, quiet_console

    if not os.environ.get("LIT_PREF_DEBUG"):
        quiet_console()
    try:
        LitPrefCLI(
            AlignmentModule,
            PreferenceDataModule,
            subclass_mode_model=True,
            trainer_class=Trainer,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except ConfigError as error:
        if os.environ.get("LIT_PREF_DEBUG"):
            raise
        print(f"lit-pref: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as error:
        if os.environ.get("LIT_PREF_DEBUG"):
            raise
        say(f"lit-pref: error: {error}")  # every rank stops together; rank zero says why
        raise SystemExit(3) from None
    except (ValueError, TypeError, OSError) as error:  # OSError: missing files, hub unreachable
        if os.environ.get("LIT_PREF_DEBUG"):
            raise
        cause = original_error(error)
        message = " ".join(str(cause).split())
        print(f"lit-pref: error: {type(cause).__name__}: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
