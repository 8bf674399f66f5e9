"""``docs/trl_migration.md`` against the installed TRL and lit_pref's own signatures.

* every field TRL 1.16's configs add to ``TrainingArguments`` has a row in the migration table;
* the TRL defaults written in the table are TRL's, and the lit_pref defaults are the code's;
* where the two defaults differ, the field is in :data:`DIFFERENT_DEFAULTS` with the reason the
  page gives, so a changed default cannot pass unnoticed and an equal one is not listed.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainingArguments
from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, RLOOConfig
from trl.experimental.cpo import CPOConfig
from trl.experimental.orpo import ORPOConfig

from lit_pref.callbacks import RefModelSync, SampleTable
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules import CPO, DPO, GRPO, KTO, ORPO, RewardModel

DOC = Path(__file__).resolve().parents[2] / "docs" / "trl_migration.md"
CONFIGS = {
    "DPOConfig": (DPOConfig, DPO),
    "KTOConfig": (KTOConfig, KTO),
    "CPOConfig": (CPOConfig, CPO),
    "ORPOConfig": (ORPOConfig, ORPO),
    "RewardConfig": (RewardConfig, RewardModel),
    "GRPOConfig": (GRPOConfig, GRPO),
    "RLOOConfig": (RLOOConfig, GRPO),
}

# (config, field) → why lit_pref's default differs; each is explained on the migration page.
DIFFERENT_DEFAULTS = {
    ("DPOConfig", "truncation_mode"): "a different truncation rule (prompt first)",
    ("CPOConfig", "beta"): "null resolves per loss type: 0.1, or SimPO's 2.0",
    ("CPOConfig", "cpo_alpha"): "null resolves per loss type: 1.0, or 0 for pure SimPO",
    ("CPOConfig", "simpo_gamma"): "SimPO's γ/β = 0.5 at its β = 2",
    ("GRPOConfig", "disable_dropout"): "dropout off for every algorithm",
    ("GRPOConfig", "top_k"): "None and 0 both disable top-k",
    ("GRPOConfig", "beta"): "Shao et al. 2024's β = 0.04",
    ("GRPOConfig", "loss_type"): "Shao et al. 2024's per-sequence mean",
    ("GRPOConfig", "scale_rewards"): "null resolves to group (none for RLOO)",
    ("GRPOConfig", "num_completions_to_print"): "SampleTable shows 8 rows",
    ("GRPOConfig", "steps_per_generation"): "None: one optimizer step per generation, num_mini_batches 1",
    ("RLOOConfig", "steps_per_generation"): "None: one optimizer step per generation, num_mini_batches 1",
    ("RLOOConfig", "disable_dropout"): "dropout off for every algorithm",
    ("RLOOConfig", "num_generations"): "GRPO's G = 8",
    ("RLOOConfig", "top_k"): "None and 0 both disable top-k",
    ("RLOOConfig", "beta"): "a different KL term (per-token k3 in the loss)",
    ("RLOOConfig", "num_completions_to_print"): "SampleTable shows 8 rows",
    **{
        (c, "pad_to_multiple_of"): "TRL's auto is no padding off Neuron"
        for c in CONFIGS
        if c != "ORPOConfig" and c != "CPOConfig"
    },
}

TRAINING_ARGUMENTS = {f.name for f in dataclasses.fields(TrainingArguments)}
LIT_ARGUMENT = re.compile(r"`((?:model|data|RefModelSync|SampleTable)\.\w+)` \(([^)]*)\)")
TRL_FIELD = re.compile(r"`(\w+)`(?: \(([^)]*)\))?")


def trl_fields(config: type) -> dict[str, Any]:
    """The fields ``config`` adds to TrainingArguments, with their defaults."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name in TRAINING_ARGUMENTS:
            continue
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def table_rows(section: str) -> list[tuple[str, str]]:
    """(first cell, second cell) of each table row under the ``## `section``` heading."""
    text = DOC.read_text()
    start = text.index(f"## `{section}`")
    end = text.find("\n## ", start + 1)
    rows = []
    for line in text[start : end if end > 0 else None].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            rows.append((cells[0], cells[1]))
    return rows


def signature_defaults(*classes: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in classes:
        for klass in reversed(cls.__mro__):
            if "__init__" in vars(klass):
                for name, param in inspect.signature(klass.__init__).parameters.items():
                    if param.default is not inspect.Parameter.empty:
                        out[name] = param.default
    return out


def normalise(value: Any) -> str:
    """Defaults as the page writes them: ``['sigmoid']`` as ``sigmoid``, bools and None lower-case."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]") and "," not in text:
        text = text[1:-1]
    text = text.strip("'\"").lower()
    try:
        return repr(float(text))
    except ValueError:
        return text


def lit_defaults(module: type) -> dict[str, Any]:
    return {
        **{f"model.{k}": v for k, v in signature_defaults(module).items()},
        **{f"data.{k}": v for k, v in signature_defaults(PreferenceDataModule).items()},
        **{f"RefModelSync.{k}": v for k, v in signature_defaults(RefModelSync).items()},
        **{f"SampleTable.{k}": v for k, v in signature_defaults(SampleTable).items()},
    }


@pytest.mark.parametrize("section", list(CONFIGS))
def test_every_trl_field_has_a_row(section):
    config, _ = CONFIGS[section]
    listed = [name for first, _ in table_rows(section) for name, _ in TRL_FIELD.findall(first)]
    assert sorted(set(listed)) == sorted(trl_fields(config)), "fields missing from / unknown to the page"
    assert len(listed) == len(set(listed)), "a field is listed twice"


@pytest.mark.parametrize("section", list(CONFIGS))
def test_defaults_on_the_page_are_the_code_defaults(section):
    config, module = CONFIGS[section]
    trl = trl_fields(config)
    ours = lit_defaults(module)
    different = set()
    for first, second in table_rows(section):
        trl_defaults = {name: default for name, default in TRL_FIELD.findall(first) if default}
        for name, written in trl_defaults.items():
            assert normalise(written) == normalise(trl[name]), f"TRL's {name} default is {trl[name]!r}"
        lit = LIT_ARGUMENT.findall(second)
        for argument, written in lit:
            assert argument in ours, f"{argument} is not a lit_pref argument"
            value = written.split(":")[0].split(",")[0]
            assert normalise(value) == normalise(ours[argument]), f"{argument} defaults to {ours[argument]!r}"
        if len(trl_defaults) == 1 and len(lit) == 1:
            ((name, trl_written),) = trl_defaults.items()
            if normalise(trl_written) != normalise(lit[0][1].split(":")[0]):
                different.add(name)
    documented = {field for (config_name, field) in DIFFERENT_DEFAULTS if config_name == section}
    assert different == documented


def test_trl_loss_names_are_accepted():
    """Every DPO loss name TRL 1.16 documents for ``DPOConfig.loss_type`` is a lit_pref loss name, and
    every name and alias builds a configuration."""
    from lit_pref.losses.dpo import DPO_LOSS_ALIASES, DPO_LOSS_TYPES, DPOLossConfig

    (field,) = [f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type"]
    help_text = field.metadata["help"].split("If multiple")[0]
    trl_names = re.findall(r"`'(\w+)'`", help_text)
    assert len(trl_names) == 15, help_text
    assert set(trl_names) == set(DPO_LOSS_TYPES)
    for name in [*trl_names, *DPO_LOSS_ALIASES]:
        DPOLossConfig(loss_type=name)
