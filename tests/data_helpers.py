"""Shared pieces of the data tests: offline dataset caches, a set-up ``PreferenceDataModule`` in one call."""

from __future__ import annotations

import datasets.config
import huggingface_hub.constants
import pytest

from lit_pref.data.datamodule import PreferenceDataModule


def make(source, tokenizer, target="paired", **kwargs):
    kwargs.setdefault("val_split", None)
    kwargs.setdefault("batch_size", 4)
    dm = PreferenceDataModule(source, tokenizer_name_or_path=tokenizer, target=target, **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture(autouse=True)
def isolated_offline_datasets(tmp_path, monkeypatch):
    """Dataset caches under ``tmp_path``, and no hub access whatever the environment says."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
