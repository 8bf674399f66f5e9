"""Shared fixtures: a tiny tokenizer and tiny models built locally (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lit_pref import tasks
from lit_pref.tiny import build_tiny_tokenizer, save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny byte-level BPE tokenizer (adds BOS; ChatML template that also emits BOS)."""
    return build_tiny_tokenizer(tasks.corpus())


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny causal LM + tokenizer directory (loadable with ``from_pretrained``)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_lm"), tasks.corpus())


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny one-output sequence classifier + tokenizer directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_rm"), tasks.corpus(), kind="sequence_classifier")
