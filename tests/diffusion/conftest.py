"""The tiny diffusion pipeline, built once per session (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lit_pref.tiny import save_tiny_diffusion_pipeline

    return save_tiny_diffusion_pipeline(tmp_path_factory.mktemp("tiny_sd"))
