"""The notebooks under ``notebooks/`` run end to end, at reduced size, so they never rot.

Each notebook's first code cell is tagged ``parameters`` and holds its sizes; the test replaces
that cell with tiny values (and a temporary ``OUTPUT_DIR``), executes the notebook in a fresh
kernel with nbclient, and checks the plots and tables came out.

Refresh the saved (executed, full-size) notebooks after editing one:

    .venv/bin/python tests/test_notebooks.py                     # every notebook
    .venv/bin/python tests/test_notebooks.py notebooks/quickstart.ipynb
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# Tiny sizes per notebook: every stage still runs, just for a few steps.
SMALL = {
    "quickstart.ipynb": {
        "SFT_STEPS": 6,
        "REWARD_STEPS": 4,
        "DPO_STEPS": 4,
        "BATCH_SIZE": 8,
        "N_EVAL": 16,
    },
    "online_rl.ipynb": {
        "SFT_STEPS": 6,
        "ROLLOUTS": 2,
        "PROMPTS_PER_ROLLOUT": 2,
        "NUM_GENERATIONS": 4,
        "N_EVAL": 16,
    },
}


def parameters_cell(notebook) -> int:
    """Index of the cell tagged ``parameters`` (it must be the first code cell)."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            if "parameters" not in cell.metadata.get("tags", []):
                raise AssertionError("the first code cell of a notebook must be tagged 'parameters'")
            return index
    raise AssertionError("the notebook has no code cell")


def override(source: str, values: dict[str, object]) -> str:
    """``source`` with each ``NAME = ...`` line of ``values`` replaced; every name must be present."""
    lines, seen = source.splitlines(), set()
    for i, line in enumerate(lines):
        name = line.split("=", 1)[0].strip()
        if "=" in line and name in values:
            lines[i] = f"{name} = {values[name]!r}"
            seen.add(name)
    missing = set(values) - seen
    if missing:
        raise AssertionError(f"the parameters cell does not set {sorted(missing)}")
    return "\n".join(lines)


def execute(path: Path, values: dict[str, object] | None = None, timeout: int = 600):
    """Execute the notebook at ``path`` in a fresh kernel (its directory as working directory)."""
    notebook = nbformat.read(path, as_version=4)
    if values:
        cell = notebook.cells[parameters_cell(notebook)]
        cell.source = override(cell.source, values)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    client.execute()
    return notebook


def outputs(notebook, output_type: str | None = None, mime: str | None = None) -> list:
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output_type and output.output_type != output_type:
                continue
            if mime and mime not in output.get("data", {}):
                continue
            found.append(output)
    return found


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs_at_reduced_size(name, tmp_path, monkeypatch):
    # One thread in the kernel: fastest for the tiny model, and kind to a shared machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = NOTEBOOKS / name
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    notebook = execute(path, {**SMALL[name], "OUTPUT_DIR": str(tmp_path)})
    assert not outputs(notebook, "error")
    assert len(outputs(notebook, mime="image/png")) >= 1  # the training curves
    assert len(outputs(notebook, mime="text/html")) >= 2  # the tables
    assert list(tmp_path.rglob("metrics.csv"))  # the runs logged where they were told to
    stderr = "".join(o.get("text", "") for o in outputs(notebook, "stream") if o.name == "stderr")
    assert "it/s]" not in stderr and "examples/s]" not in stderr  # no progress bars


def test_saved_notebooks_are_executed_and_small():
    """What a code host shows: every code cell ran, without errors, and the file stays small."""
    for name in SMALL:
        path = NOTEBOOKS / name
        notebook = nbformat.read(path, as_version=4)
        code_cells = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code_cells), f"{name} is saved without (all) outputs"
        assert not outputs(notebook, "error"), f"{name} is saved with an error"
        assert outputs(notebook, mime="image/png"), f"{name} is saved without its plots"
        assert path.stat().st_size < 400_000, f"{name} is {path.stat().st_size} bytes"


def main(paths: list[str]) -> None:
    """Execute notebooks at full size and save them with their outputs."""
    for path in map(Path, paths or sorted(NOTEBOOKS.glob("*.ipynb"))):
        start = time.perf_counter()
        notebook = execute(path.resolve(), timeout=1800)
        nbformat.write(notebook, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
