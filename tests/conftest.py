"""Shared fixtures: a tiny tokenizer and tiny models built locally (no network)."""

from __future__ import annotations

import os

# Before any Hugging Face import: the libraries read these once, at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
from pathlib import Path

import pytest
import torch

from lit_pref import tasks
from lit_pref.tiny import build_tiny_tokenizer, save_tiny_model


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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and two threads per process spin badly when the
    machine is shared (tests running side by side); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def in_project(tmp_path, tiny_lm_dir, monkeypatch) -> Path:
    """A working directory with ``outputs/tiny-lm`` as ``python -m lit_pref.tiny`` leaves it."""
    shutil.copytree(tiny_lm_dir, tmp_path / "outputs" / "tiny-lm")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def sft_dir(tiny_lm_dir, tmp_path_factory) -> Path:
    """The tiny model briefly SFT-trained on well-scored task demonstrations (PPO/GRPO start)."""
    from rl_helpers import mood_sft_model

    return mood_sft_model(tiny_lm_dir, tmp_path_factory.getbasetemp() / "mood_sft_lm")
