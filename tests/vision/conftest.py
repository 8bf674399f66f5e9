"""Fixtures of the vision-language tests: the tiny VLM and its processor, saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_pref.models import load_processor
from lit_pref.tiny import save_tiny_vlm


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA-style VLM and its processor (``python -m lit_pref.vision.tiny`` output)."""
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="session")
def processor(tiny_vlm_dir):
    return load_processor(str(tiny_vlm_dir))
