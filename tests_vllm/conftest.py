"""Fixtures of the vLLM tests (``make test-vllm``, in the venv with vLLM: ``.venv-vllm``).

vLLM runs in this process (no engine-core subprocess, so nothing is spawned and the tests need no
``__main__`` guard) with a 1 GiB CPU KV cache. Starting an engine costs seconds to tens of
seconds, and one process holds one engine well, so the whole session shares one
:class:`~lit_pref.engines.vllm.VLLMEngine`: it reloads the weights of whichever policy it is
given. The tiny model has hidden size 256 (head_dim 64): vLLM's CPU attention refuses head_dim 16.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from pathlib import Path

import pytest
import torch

from lit_pref import tasks
from lit_pref.tiny import save_tiny_model

HIDDEN = 256


@pytest.fixture(scope="session")
def vllm_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny causal LM (hidden 256, fp32) + tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("vllm_lm"), tasks.corpus(), hidden_size=HIDDEN)


@pytest.fixture(scope="session")
def vllm_sft_dir(vllm_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hidden-256 tiny model briefly SFT-trained on well-scored task demonstrations (the GRPO start)."""
    from rl_helpers import mood_sft_model

    return mood_sft_model(vllm_lm_dir, tmp_path_factory.getbasetemp() / "vllm_mood_sft_lm", steps=60)


@pytest.fixture(scope="session")
def engine():
    """The session's one vLLM engine (started by its first rollout)."""
    from lit_pref.engines.vllm import VLLMEngine

    return VLLMEngine(max_model_len=512, enforce_eager=True)


@pytest.fixture(autouse=True)
def one_thread():
    """As in the main suite: tiny models run fastest on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
