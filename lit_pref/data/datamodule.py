"""``PreferenceDataModule``: one data module for every dataset shape and every algorithm."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
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
from lit_pref.data.tokenize import TruncationConfig, TruncationMode, tokenize_row
from lit_pref.models import load_tokenizer

log = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Text columns consumed by tokenisation; every other column is passed through to the batch.
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "messages", "text")


def _import_object(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise DataFormatError(f"cannot import {path!r} (expected 'pkg.module:function'): {error}") from None


def load_raw(source: str | dict[str, str] | Dataset | DatasetDict, config_name: str | None = None) -> DatasetDict:
    """Load ``source`` as a ``DatasetDict``.

    ``source`` may be an in-memory ``Dataset``/``DatasetDict``; a ``{split: file}`` mapping; a
    JSON/JSONL/Parquet/CSV file; a directory written by ``save_to_disk``; ``"pkg.module:fn"``, a
    function returning any of these (a generated dataset); or a hub dataset name.
    """
    if isinstance(source, DatasetDict):
        return source
    if isinstance(source, Dataset):
        return DatasetDict({"train": source})
    if isinstance(source, dict):
        builders = {FILE_BUILDERS.get(Path(f).suffix) for f in source.values()}
        if len(builders) != 1 or None in builders:
            raise DataFormatError(f"data files must share one of the suffixes {sorted(FILE_BUILDERS)}: {source}")
        return load_dataset(builders.pop(), data_files=source)
    path = Path(source)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise DataFormatError(f"cannot read {path}: expected one of {sorted(FILE_BUILDERS)}")
        return load_dataset(FILE_BUILDERS[path.suffix], data_files={"train": str(path)})
    if path.suffix in FILE_BUILDERS and not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if ":" in source and not path.exists():
        made = _import_object(source)
        made = made() if callable(made) else made
        if isinstance(made, list):
            made = Dataset.from_list(made)
        return load_raw(made)
    return load_dataset(source, config_name)


class PreferenceDataModule(LightningDataModule):
    """Load, validate, tokenise and batch data in the shape the chosen algorithm needs.

    The shape of the source is detected from its columns (see :mod:`lit_pref.data.formats`); the
    shape needed is the module's ``data_target`` (or ``target``), and convertible sources are
    converted (paired → unpaired for KTO, paired → chosen-side SFT, anything → prompt-only).

    Args:
        dataset: a hub name, a ``save_to_disk`` directory, a JSON/JSONL/Parquet/CSV file, a
            ``{split: file}`` mapping, ``"pkg.module:function"`` returning a dataset, or a
            ``datasets.Dataset``/``DatasetDict``.
        dataset_config: the hub dataset's configuration name.
        train_split: split to train on.
        val_split: split to validate on; missing splits fall back to ``val_size``.
        val_size: fraction (< 1) or number of training rows held out for validation when
            ``val_split`` is absent (0: no validation).
        tokenizer_name_or_path: the tokenizer (linked from the model in the CLI); ``None`` uses
            the module's tokenizer.
        target: the shape to produce (``paired``, ``unpaired``, ``sft``, ``prompt_only``);
            ``None`` asks the module being trained.
        max_length: limit on prompt + completion tokens.
        max_prompt_length: limit on prompt tokens.
        max_completion_length: limit on completion tokens.
        truncation_mode: ``keep_end``, ``keep_start``, ``drop`` or ``error`` (see ``TruncationConfig``).
        completion_only_loss: SFT trains on completion / assistant tokens only.
        packing: SFT only: pack each batch's examples into as few rows of ``max_length`` tokens as
            fit (see :mod:`lit_pref.data.packing`); ``batch_size`` then counts examples, not rows.
        batch_size: rows per training micro-batch (a paired row holds chosen and rejected).
        eval_batch_size: rows per validation batch (default: ``batch_size``).
        num_workers: data loader worker processes.
        pad_to_multiple_of: round padded lengths up to a multiple of this.
        num_proc: processes for tokenisation.
        seed: seed for the held-out split.
        max_train_samples: keep only the first N training rows (quick runs).
        max_val_samples: keep only the first N validation rows.
    """

    def __init__(
        self,
        dataset: str | dict[str, str] | Dataset | DatasetDict = "lit_pref.tasks:mood_preferences",
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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.source = dataset
        self.dataset_config = dataset_config
        self.train_split, self.val_split, self.val_size = train_split, val_split, val_size
        self.tokenizer_source = tokenizer_name_or_path
        self.target = target
        self.truncation = TruncationConfig(max_length, max_prompt_length, max_completion_length, truncation_mode)
        self.completion_only_loss = completion_only_loss
        if packing and max_length is None:
            raise ValueError("packing needs max_length (the length of a packed row)")
        self.packing = packing
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pad_to_multiple_of, self.num_proc, self.seed = num_workers, pad_to_multiple_of, num_proc, seed
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.splits: dict[str, Dataset] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # ---------------------------------------------------------------- context
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_source is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_source)
            elif self.trainer is not None and hasattr(self.trainer.lightning_module, "tokenizer"):
                self._tokenizer = self.trainer.lightning_module.tokenizer
            else:
                raise ValueError("PreferenceDataModule needs tokenizer_name_or_path (or a module with a tokenizer)")
        return self._tokenizer

    @property
    def data_target(self) -> str:
        if self.target is not None:
            return self.target
        if self.trainer is not None and hasattr(self.trainer.lightning_module, "data_target"):
            return self.trainer.lightning_module.data_target
        raise ValueError("PreferenceDataModule needs target= when used without a lit_pref module")

    # --------------------------------------------------------------- building
    def _raw_splits(self) -> dict[str, Dataset]:
        raw = load_raw(self.source, self.dataset_config)
        if self.train_split not in raw:
            raise DataFormatError(f"split {self.train_split!r} not found; the dataset has {sorted(raw)}")
        splits = {"train": raw[self.train_split]}
        if self.val_split is not None and self.val_split in raw:
            splits["val"] = raw[self.val_split]
        elif self.val_size:
            size = self.val_size if self.val_size < 1 else int(self.val_size)
            held = splits["train"].train_test_split(test_size=size, seed=self.seed)
            splits = {"train": held["train"], "val": held["test"]}
        limits = {"train": self.max_train_samples, "val": self.max_val_samples}
        return {
            name: ds.select(range(min(limits[name], len(ds)))) if limits[name] is not None else ds
            for name, ds in splits.items()
        }

    def build_split(self, name: str, raw: Dataset) -> Dataset:
        """Validate, convert, tokenise and truncate one split; log what happened to it."""
        target = self.data_target
        shape = detect_shape(raw.column_names)
        check_convertible(shape, target)
        ds = raw.map(normalise_row, fn_kwargs={"shape": shape}, with_indices=True, desc=f"checking {name} rows")
        if target == "unpaired" and shape == "paired":
            ds = ds.map(paired_to_unpaired, batched=True, remove_columns=ds.column_names, desc="pairs → unpaired")
        text_columns = [c for c in TEXT_COLUMNS if c in ds.column_names and not (c == "prompt" and target == "prompt_only")]
        ds = ds.map(
            tokenize_row,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "target": target,
                "truncation": self.truncation,
                "completion_only_loss": self.completion_only_loss,
            },
            with_indices=True,
            remove_columns=text_columns,
            num_proc=self.num_proc,
            desc=f"tokenising {name}",
        )
        counts = {flag: sum(ds[f"_{flag}"]) for flag in ("truncated_prompt", "truncated_completion", "drop")}
        if counts["drop"]:
            ds = ds.filter(lambda dropped: not dropped, input_columns="_drop", desc="dropping rows")
        ds = ds.remove_columns(["_truncated_prompt", "_truncated_completion", "_drop"])
        if "index" not in ds.column_names:
            ds = ds.add_column("index", list(range(len(ds))))
        if target == "unpaired":  # KTO's KL pairs: each prompt with another row's completion
            ds = add_mismatched_completions(ds, self.truncation.max_length)
        rank_zero_info(
            f"{name}: {len(raw)} rows ({shape} → {target}); {counts['truncated_prompt']} prompts and "
            f"{counts['truncated_completion']} completions truncated, {counts['drop']} rows dropped; "
            f"{len(ds)} rows kept"
        )
        if len(ds) == 0:
            raise DataFormatError(f"no {name} rows left after truncation; raise max_length or change truncation_mode")
        if counts["truncated_completion"] > len(raw) / 2:
            rank_zero_warn(
                f"{counts['truncated_completion']} of {len(raw)} {name} completions were truncated: most of "
                "what the model would learn from is cut; raise max_length / max_completion_length"
            )
        self.counts = getattr(self, "counts", {}) | {name: counts}
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
        decode = self.tokenizer.decode
        text = decode(row["prompt_input_ids"])
        for key in ("chosen_input_ids", "rejected_input_ids", "completion_input_ids"):
            if key in row:
                ids, mask = row[key], row.get("completion_mask") or [1] * len(row[key])
                pieces = [decode([t]) if m == 0 else f"⟦{decode([t])}⟧" for t, m in zip(ids, mask, strict=True)]
                text += f"\n[{key.removesuffix('_input_ids')}] " + "".join(pieces)
        rank_zero_info(f"example training row (completion tokens in ⟦ ⟧):\n{text}")

    def fingerprint(self, split: str) -> str:
        """The datasets fingerprint of a tokenised split (a cache key for derived data)."""
        return self.splits[split]._fingerprint

    # ------------------------------------------------------------ dataloaders
    @property
    def collator(self) -> Collator | PackingCollator:
        if self.packing:
            if self.data_target != "sft":
                raise ValueError(f"packing applies to SFT data only, not to {self.data_target!r} data")
            return PackingCollator(self.tokenizer.pad_token_id, self.truncation.max_length, self.pad_to_multiple_of)
        return Collator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.splits[split].with_format(None),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size, shuffle=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def sequential_dataloader(self, split: str) -> DataLoader:
        """Every row of ``split`` in order, unsharded (for precomputing per-row values)."""
        return self._loader(split, self.eval_batch_size, shuffle=False)
