"""``PreferenceDataModule``: one data module for every dataset shape and every algorithm."""

import bisect
import contextlib
import importlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_pref.data.collate import Collator
from lit_pref.data.formats import (
    DataFormatError,
    check_convertible,
    detect_shape,
    normalise_row,
    paired_to_unpaired,
)
from lit_pref.data.mismatch import add_mismatched_completions
from lit_pref.data.packing import PackingCollator
from lit_pref.data.sampling import count_trained_batch, resumable_loader
from lit_pref.data.sources import check_source, looks_local, missing_path_message, offline_hint
from lit_pref.data.tokenize import TruncationConfig, TruncationMode, tokenize_row
from lit_pref.models import load_processor, load_tokenizer
from lit_pref.vision.images import IMAGES_COLUMN, images_fingerprint

# datasets (with pandas and pyarrow: half a second) is imported where data is loaded, not here: the
# CLI reads PreferenceDataModule's signature to build its parser, for `--help` too. The module
# has no `from __future__ import annotations` for the same reason: jsonargparse evaluates string
# annotations by running the TYPE_CHECKING block below; the datasets names are quoted instead.
if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


class InMemoryDataset(Protocol):
    """A ``datasets.Dataset`` or ``DatasetDict`` passed in Python (a structural type, so that the
    signature the CLI reads names no ``datasets`` class)."""

    @property
    def column_names(self) -> Any: ...


log = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# What datasets decompresses on the fly (fsspec's compressions); ".jsonl.gz" reads as ".jsonl".
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# Text columns consumed by tokenisation; every other column is passed through to the batch.
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages", "text")
BadRows = Literal["error", "skip"]
# Working columns: each row's index in its source split, and why a row is bad ("" when it is not).
ROW, BAD = "_row", "_bad"
FLAGS = ("truncated_prompt", "truncated_completion", "drop", "short_prompt", "cut_image")
SHOWN_ROWS = 10


def _import_object(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise DataFormatError(f"cannot import {path!r} (expected 'pkg.module:function'): {error}") from None


def file_builder(path: str | Path) -> str | None:
    """The ``datasets`` builder that reads ``path`` (``json``, ``csv``, ``parquet``), compressed or not."""
    name = Path(path).name
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            name = name[: -len(compression)]
            break
    return FILE_BUILDERS.get(Path(name).suffix)


def _suffixes() -> str:
    return f"{', '.join(sorted(FILE_BUILDERS))}, optionally compressed ({', '.join(COMPRESSIONS)})"


def _shown(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


@dataclass
class RawData:
    """Loaded splits and, for local files, each split's files in row order (to name rows)."""

    splits: "DatasetDict"
    files: dict[str, list[str]] = field(default_factory=dict)
    builder: str | None = None
    label: str | None = None  # the source in messages; None for in-memory data


def _data_files_in(directory: Path) -> dict[str, list[str]]:
    """The data files of a directory of shards, grouped into splits as ``load_dataset(dir)`` does."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    base = str(directory.resolve())
    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    except EmptyDatasetError:
        resolved = DataFilesDict()
    files = {str(split): [f for f in found if file_builder(f)] for split, found in resolved.items()}
    files = {split: found for split, found in files.items() if found}
    if not files:
        raise DataFormatError(
            f"directory {str(directory)!r} holds no data files ({_suffixes()}) and was not written by save_to_disk"
        )
    return files


def _one_builder(files: dict[str, list[str]], what: str) -> str:
    builders = {file_builder(f) for found in files.values() for f in found}
    if len(builders) != 1 or None in builders:
        raise DataFormatError(f"{what} must share one of the suffixes {_suffixes()}: {files}")
    return str(builders.pop())


def _open_text(path: str) -> Any:
    import fsspec

    return fsspec.open(path, "rt", compression="infer", encoding="utf-8").open()


def _diagnose_file(path: str, builder: str) -> str | None:
    """One line saying what is wrong with a data file ``datasets`` failed to read, or None."""
    problem = _file_problem(path, builder)
    return None if problem is None else f"data file {_shown(path)!r} {problem}"


def _file_problem(path: str, builder: str) -> str | None:
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    try:
        if builder == "parquet":
            import pyarrow.parquet

            if pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0:
                return "holds no rows"
            return None
        with _open_text(path) as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as error:
        kind = "UTF-8 text" if isinstance(error, UnicodeDecodeError) else f"a readable {builder} file"
        return f"is not {kind}: {' '.join(str(error).split())}"
    if not text.strip():
        return "holds no rows (only whitespace)"
    if builder == "csv":
        return "holds no rows (a header line only)" if len(text.strip().splitlines()) < 2 else None
    lines = text.splitlines()
    first = next(line for line in lines if line.strip())
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as error:
        try:
            json.loads(first)
        except json.JSONDecodeError:
            return f"line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})"
    else:
        return f"holds no rows ({text.strip()})" if whole in ([], {}) else None
    for number, line in enumerate(lines, 1):  # JSON lines: find the first line that is not JSON
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}: not valid JSON ({error.msg}, column {error.colno})"
        if not isinstance(value, dict):
            return f"line {number}: expected a JSON object per line, got {type(value).__name__}"
    return None


def _read_files(builder: str, files: dict[str, list[str]]) -> "DatasetDict":
    """``load_dataset(builder, data_files=files)``, with a broken file named in one line."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    for found in files.values():
        for path in found:
            if not Path(path).is_file():
                raise FileNotFoundError(missing_path_message("data file", path))
    # datasets logs the parser's error itself before raising; the one line below says it better.
    noisy = logging.getLogger("datasets.packaged_modules")
    level = noisy.level
    noisy.setLevel(logging.CRITICAL)
    try:
        return load_dataset(builder, data_files=files)
    except Exception as error:
        for path in (p for found in files.values() for p in found):
            problem = _diagnose_file(path, builder)
            if problem is not None:
                raise DataFormatError(problem) from error
        if not isinstance(error, DatasetGenerationError):
            raise
        # Every file parses on its own (e.g. shards with different columns): datasets' reason is the
        # innermost cause, under a generic "An error occurred while generating the dataset".
        cause: BaseException = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        shown = ", ".join(_shown(p) for found in files.values() for p in found)
        reason = " ".join(str(cause).split())
        raise DataFormatError(f"cannot read {shown}: {type(cause).__name__}: {reason}") from error
    finally:
        noisy.setLevel(level)


def _load_hub(source: str, config_name: str | None) -> "DatasetDict":
    from datasets import load_dataset

    check_source(source, "dataset", cached=True)  # offline mode if the Hub is unreachable
    try:
        return load_dataset(source, config_name)
    except ConnectionError as error:
        raise ConnectionError(f"{' '.join(str(error).split())}; {offline_hint('dataset', source)}") from error


def _load(source: str | dict[str, str] | InMemoryDataset, config_name: str | None = None) -> RawData:
    from datasets import Dataset, DatasetDict, load_from_disk

    if isinstance(source, DatasetDict):
        return RawData(source)
    if isinstance(source, Dataset):
        return RawData(DatasetDict({"train": source}))
    if isinstance(source, dict):
        files = {split: [str(Path(f).expanduser())] for split, f in source.items()}
        builder = _one_builder(files, "data files")
        return RawData(_read_files(builder, files), files, builder, "the data files")
    if not isinstance(source, str):
        raise TypeError(
            "dataset must be a name, a path, a {split: file} mapping or a datasets.Dataset / DatasetDict, "
            f"got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            loaded = load_from_disk(str(path))
            splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
            return RawData(splits, label=_shown(str(path)))
        files = _data_files_in(path)
        builder = _one_builder(files, f"the data files in {str(path)!r}")
        return RawData(_read_files(builder, files), files, builder, _shown(str(path)))
    if path.is_file():
        file_type = file_builder(path)
        if file_type is None:
            raise DataFormatError(f"cannot read {str(path)!r}: expected one of {_suffixes()}")
        files = {"train": [str(path)]}
        return RawData(_read_files(file_type, files), files, file_type, _shown(str(path)))
    if file_builder(path) is not None:
        raise FileNotFoundError(missing_path_message("data file", source))
    if ":" in source:
        made = _import_object(source)
        made = made() if callable(made) else made
        if isinstance(made, list):
            made = Dataset.from_list(made)
        return RawData(_load(made).splits, label=source)
    if looks_local(source):
        raise FileNotFoundError(missing_path_message("dataset path", source))
    return RawData(_load_hub(source, config_name), label=source)


def load_raw(source: str | dict[str, str] | InMemoryDataset, config_name: str | None = None) -> "DatasetDict":
    """Load ``source`` as a ``DatasetDict``.

    ``source`` may be an in-memory ``Dataset``/``DatasetDict``; a ``{split: file}`` mapping; a
    JSON/JSONL/Parquet/CSV file, compressed or not (``.jsonl.gz``); a directory of such files
    (shards, grouped into splits by their names as ``load_dataset(directory)`` does); a directory
    written by ``save_to_disk``; ``"pkg.module:fn"``, a function returning any of these (a
    generated dataset); or a hub dataset name. A path that does not exist fails at once, and so
    does a hub name when the Hub cannot be reached and the dataset is not cached.
    """
    return _load(source, config_name).splits


def _find_bad_row(row: dict[str, Any], shape: str) -> dict[str, str]:
    try:
        normalise_row(row, row[ROW], shape)
    except DataFormatError as error:
        if error.row is None:
            raise
        return {BAD: error.reason}
    return {BAD: ""}


def _normalise(row: dict[str, Any], shape: str) -> dict[str, Any]:
    return normalise_row(row, row[ROW], shape)


TOKEN_KEYS = {
    "paired": ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
    "unpaired": ("prompt_input_ids", "completion_input_ids"),
    "sft": ("prompt_input_ids", "completion_input_ids", "completion_mask"),
    "prompt_only": ("prompt_input_ids",),
}


def _tokenize(row: dict[str, Any], *, skip: bool, **kwargs: Any) -> dict[str, Any]:
    try:
        out = tokenize_row(row, row[ROW], **kwargs)
    except DataFormatError as error:
        if not (skip and error.row is not None and error.skippable):
            raise
        # Same columns as a good row, so the map's schema holds; the row is filtered out after.
        out = {key: [] for key in TOKEN_KEYS[kwargs["target"]]} | {f"_{flag}": False for flag in FLAGS}
        out[BAD] = error.reason
        return out
    out[BAD] = ""
    return out


class PreferenceDataModule(LightningDataModule):
    """Load, validate, tokenise and batch data in the shape the chosen algorithm needs.

    The shape of the source is detected from its columns (see :mod:`lit_pref.data.formats`); the
    shape needed is the module's ``data_target`` (or ``target``), and convertible sources are
    converted (paired → unpaired for KTO, paired → chosen-side SFT, anything → prompt-only).

    Args:
        dataset: a hub name, a JSON/JSONL/Parquet/CSV file (compressed too: ``.jsonl.gz``), a
            directory of such files (shards), a ``save_to_disk`` directory, a ``{split: file}``
            mapping, ``"pkg.module:function"`` returning a dataset, or a ``datasets.Dataset``/
            ``DatasetDict``.
        dataset_config: the hub dataset's configuration name.
        train_split: split to train on.
        val_split: split to validate on; missing splits fall back to ``val_size``.
        val_size: fraction (< 1) or number of training rows held out for validation when
            ``val_split`` is absent (0: no validation).
        tokenizer_name_or_path: the tokenizer (linked from the model in the CLI); ``None`` uses
            the module's tokenizer. For data with an ``images`` column it names the processor
            (``AutoProcessor``: a vision-language model's chat template, tokenizer and image processor).
        target: the shape to produce (``paired``, ``unpaired``, ``sft``, ``prompt_only``);
            ``None`` asks the module being trained.
        max_length: limit on prompt + completion tokens.
        max_prompt_length: limit on prompt tokens.
        max_completion_length: limit on completion tokens.
        truncation_mode: ``keep_end``, ``keep_start``, ``drop`` or ``error`` (see ``TruncationConfig``).
        completion_only_loss: SFT trains on completion / assistant tokens only.
        packing: padding-free batches (SFT, paired and unpaired data): each prompt once, followed
            by its completions, packed into as few sequences of ``max_length`` tokens as fit, with
            an attention mask that keeps every completion to its own prompt (see
            :mod:`lit_pref.data.packing`): the same log-probs as the padded layout with no padding
            computed. ``batch_size`` still counts rows.
        batch_size: rows per training micro-batch (a paired row holds chosen and rejected).
        eval_batch_size: rows per validation batch (default: ``batch_size``).
        num_workers: data loader worker processes.
        pad_to_multiple_of: round padded lengths up to a multiple of this.
        num_proc: processes for tokenisation.
        seed: seed for the held-out split.
        max_train_samples: keep only the first N training rows (quick runs).
        max_val_samples: keep only the first N validation rows.
        min_prompt_length: prompts truncation leaves shorter than this many tokens (or than
            ``max_prompt_length``, if smaller) are counted and warned about (``None``: no check).
        bad_rows: what a row that does not fit the dataset's shape does (an empty answer, a
            wrong type, an unknown conversation role): ``error`` stops at the first one, naming
            its row in the source file; ``skip`` leaves such rows out, counted and listed by
            their row in the source file.
    """

    def __init__(
        self,
        dataset: str | dict[str, str] | InMemoryDataset = "lit_pref.tasks:mood_preferences",
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        val_size: float = 0.0,
        tokenizer_name_or_path: str | None = None,
        target: str | None = None,
        max_length: int | None = 1024,
        max_prompt_length: int | None = 512,
        max_completion_length: int | None = None,
        truncation_mode: TruncationMode = "keep_end",
        completion_only_loss: bool = True,
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        num_proc: int | None = None,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        min_prompt_length: int | None = 8,
        bad_rows: BadRows = "error",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.source = dataset
        self.dataset_config = dataset_config
        self.train_split, self.val_split, self.val_size = train_split, val_split, val_size
        self.tokenizer_source = tokenizer_name_or_path
        self.target = target
        self.truncation = TruncationConfig(
            max_length, max_prompt_length, max_completion_length, truncation_mode, min_prompt_length
        )
        if bad_rows not in ("error", "skip"):
            raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
        self.bad_rows = bad_rows
        self.completion_only_loss = completion_only_loss
        if packing and max_length is None:
            raise ValueError("packing needs max_length (the length of a packed row)")
        self.packing = packing
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pad_to_multiple_of, self.num_proc, self.seed = num_workers, pad_to_multiple_of, num_proc, seed
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.splits: dict[str, Dataset] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self._raw: RawData | None = None
        self._origin: dict[str, str] = {}  # split built → the source split its rows come from
        self._offsets: dict[str, list[int]] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._processor: Any = None  # lit_pref.vision: loaded once a split has an images column
        self._images_fingerprints: dict[str, str] = {}

    # ---------------------------------------------------------------- context
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_source is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_source)
            elif self.trainer is not None and hasattr(self.trainer.lightning_module, "tokenizer"):
                self._tokenizer = self.trainer.lightning_module.tokenizer  # type: ignore[assignment]
            else:
                raise ValueError("PreferenceDataModule needs tokenizer_name_or_path (or a module with a tokenizer)")
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def data_target(self) -> str:
        if self.target is not None:
            return self.target
        if self.trainer is not None and hasattr(self.trainer.lightning_module, "data_target"):
            return str(self.trainer.lightning_module.data_target)
        raise ValueError("PreferenceDataModule needs target= when used without a lit_pref module")

    # --- hook: modules that train on images (lit_pref.diffusion) check and batch their own rows.
    @property
    def image_rows(self) -> Any:
        """The module's own row handling (:class:`lit_pref.diffusion.data.ImageRows`), or ``None``."""
        return getattr(self.trainer.lightning_module, "image_rows", None) if self.trainer is not None else None

    # --- vision-language data (lit_pref.vision): the processor renders and batches the images.
    @property
    def processor(self) -> Any:
        """The processor of data with an ``images`` column (``None`` until such a split is built)."""
        return self._processor

    def _vision_processor(self, raw: "Dataset") -> Any:
        """The processor ``raw``'s rows need: ``None`` without an ``images`` column."""
        if IMAGES_COLUMN not in raw.column_names:
            return None
        if self._processor is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            source = self.tokenizer_source or getattr(module, "model_source", None)
            if not isinstance(source, str):
                raise ValueError(
                    "the data has an 'images' column: PreferenceDataModule needs tokenizer_name_or_path naming "
                    "a vision-language model's processor (AutoProcessor)"
                )
            self._processor = load_processor(source)
            self._tokenizer = self._processor.tokenizer
        return self._processor

    # --------------------------------------------------------------- building
    def _raw_splits(self) -> dict[str, "Dataset"]:
        self._raw = raw = _load(self.source, self.dataset_config)
        if self.train_split not in raw.splits:
            raise DataFormatError(f"split {self.train_split!r} not found; the dataset has {sorted(raw.splits)}")
        # Numbered before any shuffle or selection, so messages name rows of the source.
        numbered = {name: ds.add_column(ROW, list(range(len(ds)))) for name, ds in raw.splits.items()}
        splits = {"train": numbered[self.train_split]}
        self._origin = {"train": self.train_split, "val": self.train_split}
        if self.val_split is not None and self.val_split in raw.splits:
            splits["val"] = numbered[self.val_split]
            self._origin["val"] = self.val_split
        elif self.val_size and len(splits["train"]):
            size = self.val_size if self.val_size < 1 else int(self.val_size)
            held = splits["train"].train_test_split(test_size=size, seed=self.seed)
            splits = {"train": held["train"], "val": held["test"]}
        limits = {"train": self.max_train_samples, "val": self.max_val_samples}
        for name, limit in limits.items():
            if limit is not None and name in splits:
                splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
        return splits

    # ------------------------------------------------------------ naming rows
    def _source_of(self, split: str) -> tuple[RawData | None, str]:
        return self._raw, self._origin.get(split, split)

    def _file_offsets(self, source_split: str) -> list[int]:
        """First row of each file of a multi-file split (read only when a row must be named)."""
        from datasets import load_dataset

        raw = self._raw
        assert raw is not None and raw.builder is not None
        if source_split not in self._offsets:
            starts, total = [], 0
            for path in raw.files[source_split]:
                starts.append(total)
                total += load_dataset(raw.builder, data_files={"train": [path]}, split="train").num_rows
            self._offsets[source_split] = starts
        return self._offsets[source_split]

    def _locate(self, split: str, row: int) -> tuple[str | None, int]:
        """(file or source, row within it) of ``row`` of the source split behind ``split``."""
        raw, source_split = self._source_of(split)
        if raw is None:
            return None, row
        files = raw.files.get(source_split, [])
        if len(files) == 1:
            return _shown(files[0]), row
        if len(files) > 1:
            starts = self._file_offsets(source_split)
            n = bisect.bisect_right(starts, row) - 1
            return _shown(files[n]), row - starts[n]
        if raw.label is None:
            return None, row
        return f"{raw.label} (split {source_split!r})", row

    def describe_row(self, split: str, row: int) -> str:
        """``row 86 of data/test.jsonl.gz``: where row ``row`` of ``split``'s source comes from."""
        where, index = self._locate(split, row)
        return f"row {index}" if where is None else f"row {index} of {where}"

    def describe_rows(self, split: str, rows: list[int]) -> str:
        """``rows 3, 9 of a.jsonl; 0 of b.jsonl`` for the first few of ``rows``."""
        groups: dict[str | None, list[str]] = {}
        for row in rows[:SHOWN_ROWS]:
            where, index = self._locate(split, row)
            groups.setdefault(where, []).append(str(index))
        noun = "row " if len(rows) == 1 else "rows "
        text = "; ".join(
            (noun if i == 0 else "") + ", ".join(indices) + ("" if where is None else f" of {where}")
            for i, (where, indices) in enumerate(groups.items())
        )
        return text + (f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else "")

    @contextlib.contextmanager
    def _naming_rows(self, split: str) -> Iterator[None]:
        """Re-raise a row's error with the row named in the source file."""
        try:
            yield
        except DataFormatError as error:
            if error.row is None:
                raise
            hint = "; data.bad_rows=skip leaves such rows out" if error.skippable and self.bad_rows == "error" else ""
            raise DataFormatError(
                f"{self.describe_row(split, error.row)}: {error.reason}{hint}",
                row=error.row,
                reason=error.reason,
                skippable=error.skippable,
            ) from None

    # --------------------------------------------------------------- building
    def _describe_source(self, split: str) -> str:
        raw, source_split = self._source_of(split)
        label = raw.label if raw is not None and raw.label is not None else "the dataset"
        return f"split {source_split!r} of {label}"

    def build_split(self, name: str, raw: "Dataset") -> "Dataset":
        """Validate, convert, tokenise and truncate one split; log what happened to it."""
        if self.image_rows is not None:  # lit_pref.diffusion hook
            return self.image_rows.build_split(name, raw)
        target = self.data_target
        if len(raw) == 0:
            raise DataFormatError(f"the {name} data ({self._describe_source(name)}) has no rows")
        shape = detect_shape([c for c in raw.column_names if c != ROW])
        check_convertible(shape, target)
        if ROW not in raw.column_names:
            raw = raw.add_column(ROW, list(range(len(raw))))
        skip = self.bad_rows == "skip"
        bad: list[tuple[int, str]] = []
        with self._naming_rows(name):
            ds = raw
            if skip:
                ds = ds.map(_find_bad_row, fn_kwargs={"shape": shape}, desc=f"checking {name} rows")
                bad += [(r, why) for r, why in zip(ds[ROW], ds[BAD], strict=True) if why]
                if bad:
                    ds = ds.filter(lambda why: not why, input_columns=BAD, desc="leaving out bad rows")
                ds = ds.remove_columns(BAD)
            if len(ds):
                ds = ds.map(_normalise, fn_kwargs={"shape": shape}, desc=f"normalising {name} rows")
            if len(ds) and target == "unpaired" and shape == "paired":
                ds = ds.map(paired_to_unpaired, batched=True, remove_columns=ds.column_names, desc="pairs → unpaired")
            text_columns = [
                c for c in TEXT_COLUMNS if c in ds.column_names and not (c == "prompt" and target == "prompt_only")
            ]
            if len(ds):
                ds = ds.map(
                    _tokenize,
                    fn_kwargs={
                        "skip": skip,
                        "tokenizer": self.tokenizer,
                        "target": target,
                        "truncation": self.truncation,
                        "completion_only_loss": self.completion_only_loss,
                        "processor": self._vision_processor(ds),
                    },
                    remove_columns=text_columns,
                    num_proc=self.num_proc,
                    desc=f"tokenising {name}",
                )
        if BAD in ds.column_names:
            tokenising_bad = [(r, why) for r, why in zip(ds[ROW], ds[BAD], strict=True) if why]
            bad += tokenising_bad
        else:
            tokenising_bad = []
        counts = {flag: sum(ds[f"_{flag}"]) if f"_{flag}" in ds.column_names else 0 for flag in FLAGS}
        counts["bad"] = len(bad)
        short_rows = []
        if counts["short_prompt"]:
            short_rows = [r for r, short in zip(ds[ROW], ds["_short_prompt"], strict=True) if short]
        if counts["drop"] or tokenising_bad:
            keep = ("_drop", BAD)
            ds = ds.filter(lambda dropped, why: not dropped and not why, input_columns=list(keep), desc="dropping rows")
        ds = ds.remove_columns([c for c in (*(f"_{f}" for f in FLAGS), BAD, ROW) if c in ds.column_names])
        if "index" not in ds.column_names:
            ds = ds.add_column("index", list(range(len(ds))))
        if target == "unpaired" and len(ds):  # KTO's KL pairs: each prompt with another row's completion
            ds = add_mismatched_completions(ds, self.truncation.max_length)
        skipped = f", {counts['bad']} bad rows skipped" if skip else ""
        rank_zero_info(
            f"{name}: {len(raw)} rows ({shape} → {target}); {counts['truncated_prompt']} prompts and "
            f"{counts['truncated_completion']} completions truncated, {counts['drop']} rows dropped{skipped}; "
            f"{len(ds)} rows kept"
        )
        if bad:
            bad.sort()
            rank_zero_warn(
                f"{name}: skipped {len(bad)} of {len(raw)} rows that do not fit the {shape} shape (bad_rows=skip): "
                f"{self.describe_rows(name, [r for r, _ in bad])}; first: {self.describe_row(name, bad[0][0])}: "
                f"{bad[0][1]}"
            )
        if len(ds) == 0 and not bad:
            raise DataFormatError(f"no {name} rows left after truncation; raise max_length or change truncation_mode")
        if len(ds) == 0:
            raise DataFormatError(
                f"no {name} rows left: all {counts['bad']} bad rows were skipped, {counts['drop']} more dropped by "
                f"truncation; first bad one: {self.describe_row(name, bad[0][0])}: {bad[0][1]}"
            )
        if counts["cut_image"]:
            rank_zero_warn(
                f"{counts['cut_image']} of {len(raw)} {name} rows dropped: truncation would have cut into their "
                "image tokens; raise max_length / max_prompt_length (or truncation_mode=error to stop instead)"
            )
        if counts["truncated_completion"] > len(raw) / 2:
            rank_zero_warn(
                f"{counts['truncated_completion']} of {len(raw)} {name} completions were truncated: most of "
                "what the model would learn from is cut; raise max_length / max_completion_length"
            )
        if short_rows:
            t = self.truncation
            rank_zero_warn(
                f"{len(short_rows)} of {len(raw)} {name} prompts were cut below {t.prompt_floor} tokens "
                f"(min_prompt_length={t.min_prompt_length}, max_length={t.max_length}, max_prompt_length="
                f"{t.max_prompt_length}), e.g. {self.describe_rows(name, short_rows[:3])}: their completions "
                "answer a prompt the model no longer sees; raise max_length, set max_completion_length so "
                "completions leave the prompt room, or use truncation_mode=drop"
            )
        self.counts = self.counts | {name: counts}
        return ds

    def prepare_data(self) -> None:
        # Rank 0 only: downloads, and tokenisation of file-backed data, land in the datasets cache
        # that every rank's setup then reads.
        if isinstance(self.source, str) and ":" not in self.source:
            for name, raw in self._raw_splits().items():
                self.build_split(name, raw)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.splits = {name: self.build_split(name, raw) for name, raw in self._raw_splits().items()}
        self.log_example(self.splits["train"][0])

    def log_example(self, row: dict[str, Any]) -> None:
        """Show one decoded training row with the trained completion tokens in ⟦brackets⟧."""
        if self.image_rows is not None:  # lit_pref.diffusion hook
            rank_zero_info(self.image_rows.describe(row))
            return
        decode = self.tokenizer.decode
        text = decode(row["prompt_input_ids"])
        for key in ("chosen_input_ids", "rejected_input_ids", "completion_input_ids"):
            if key in row:
                ids, mask = row[key], row.get("completion_mask") or [1] * len(row[key])
                pieces = [str(decode([t])) if m == 0 else f"⟦{decode([t])}⟧" for t, m in zip(ids, mask, strict=True)]
                text = f"{text}\n[{key.removesuffix('_input_ids')}] " + "".join(pieces)
        rank_zero_info(f"example training row (completion tokens in ⟦ ⟧):\n{text}")

    def fingerprint(self, split: str) -> str:
        """The datasets fingerprint of a tokenised split (a cache key for derived data), and of its
        images' pixels when it has any (a path's file may change under the same path)."""
        dataset = self.splits[split]
        if IMAGES_COLUMN not in dataset.column_names:
            return dataset._fingerprint
        if split not in self._images_fingerprints:
            self._images_fingerprints[split] = images_fingerprint(dataset[IMAGES_COLUMN])
        return f"{dataset._fingerprint}+images:{self._images_fingerprints[split]}"

    # ------------------------------------------------------------ dataloaders
    @property
    def collator(self) -> Collator | PackingCollator | Any:
        if self.image_rows is not None:  # lit_pref.diffusion hook
            return self.image_rows
        if self.packing:
            if self.data_target == "prompt_only":
                raise ValueError("packing applies to rows with completions (sft, paired, unpaired), not to prompt-only data")
            if self._processor is not None:
                raise ValueError("packing does not take image rows yet; set packing: false")
            assert self.truncation.max_length is not None  # __init__ refuses packing without it
            return PackingCollator(self.tokenizer.pad_token_id, self.truncation.max_length, self.pad_to_multiple_of)
        return Collator(self.tokenizer.pad_token_id, self.pad_to_multiple_of, processor=self._processor)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.splits[split].with_format(None),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        # Resumable: a checkpoint records the loader's position, so a resumed run continues the
        # epoch where it stopped, in the same order.
        return resumable_loader(
            self.splits["train"].with_format(None),
            self.batch_size,
            self.trainer,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            count_trained_batch(self.trainer)
        return batch

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size, shuffle=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def sequential_dataloader(self, split: str) -> DataLoader:
        """Every row of ``split`` in order, unsharded (for precomputing per-row values)."""
        return self._loader(split, self.eval_batch_size, shuffle=False)
