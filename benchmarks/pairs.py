"""Paired benchmark runs that hold up on a noisy machine: configurations A and B alternate
(A B A B …), each run in a fresh subprocess, and the comparison is the median of the per-pair
ratios A/B, with their min and max and a warning when the spread is too wide to trust.

A pair's two runs are neighbours in time, so load that drifts over minutes (other jobs starting
or ending) lands on both sides of each ratio instead of on one configuration; the median ignores
a pair hit by a burst. Each run is its own process, so neither side inherits the other's
allocator state, thread pools or compiled kernels.

A benchmark script uses it in two halves::

    # in the child (the script re-invoked with arguments that select one configuration)
    pairs.emit({"tokens_per_s": 1234.0, "median_step_s": 0.5})

    # in the parent
    comparison = pairs.run_pairs(
        [sys.executable, __file__, "--run", "a"], [sys.executable, __file__, "--run", "b"],
        metric="tokens_per_s", pairs=3, names=("lit_pref", "TRL"),
    )
    print(comparison.report())

A child that cannot measure (an optional library missing) emits ``{"unavailable": reason}``; one
that crashes is reported with the last line of its error output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX = "RESULT "
# glibc's malloc returns blocks of 32 MiB and more to the system on every free (and trims its heap
# top past 64 MiB), so each fresh [tokens, vocab] tensor is paid again in page faults. Thresholds
# beyond any tensor of the throughput runs keep freed memory for reuse, as a GPU's caching allocator does.
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--keep-freed-memory`` flag of a benchmark (for :func:`malloc`)."""
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run the compared children (both sides) with glibc's malloc keeping freed memory for reuse "
                             f"(GLIBC_TUNABLES={KEEP_FREED_MEMORY})")  # fmt: skip


@contextlib.contextmanager
def malloc(keep_freed_memory: bool) -> Iterator[None]:
    """The allocator of the child runs started within it (they inherit the environment): glibc's
    default, or with ``keep_freed_memory`` its :data:`KEEP_FREED_MEMORY` thresholds, after any
    ``GLIBC_TUNABLES`` already set. Prints which."""
    saved = os.environ.get("GLIBC_TUNABLES")
    if keep_freed_memory:
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (saved, KEEP_FREED_MEMORY)))
    print(f"malloc: {'freed memory kept (' + KEEP_FREED_MEMORY + ')' if keep_freed_memory else 'default'}")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = saved


def emit(result: dict[str, Any]) -> None:
    """Print a child run's figures (JSON on one ``RESULT`` line of standard output)."""
    print(PREFIX + json.dumps(result), flush=True)


def run_once(argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run one child process and return the figures it emitted, or ``{"error": …}``."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(PREFIX)), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"error": tail[0]}
    return json.loads(line.removeprefix(PREFIX))


def matmul_gflops(threads: int | None = None) -> float:
    """The machine's fp32 matmul throughput (GFLOP/s of a 2048² × 2048² product): the peak a
    step's matmuls are measured against."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


@dataclass
class Comparison:
    """The runs of an A/B comparison and the statistics of their per-pair ratios.

    Attributes:
        names: display names of A and B.
        metric: the figure compared (a key of each run's result).
        runs_a: every A run's figures, in order (``{"error": …}`` / ``{"unavailable": …}`` for
            one that did not measure).
        runs_b: every B run's figures, in order.
        max_spread: the largest max/min ratio of the pair ratios still called trustworthy.
    """

    names: tuple[str, str]
    metric: str
    runs_a: list[dict[str, Any]] = field(default_factory=list)
    runs_b: list[dict[str, Any]] = field(default_factory=list)
    max_spread: float = 1.25

    @property
    def ratios(self) -> list[float]:
        """A/B of the metric for each pair where both runs measured it."""
        return [
            a[self.metric] / b[self.metric]
            for a, b in zip(self.runs_a, self.runs_b, strict=False)
            if self.metric in a and self.metric in b and b[self.metric]
        ]

    @property
    def median(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def spread(self) -> float | None:
        """max / min of the pair ratios (1 when they all agree)."""
        ratios = self.ratios
        return max(ratios) / min(ratios) if ratios and min(ratios) > 0 else None

    @property
    def trustworthy(self) -> bool:
        """At least three pairs measured and their ratios within ``max_spread`` of each other."""
        return len(self.ratios) >= 3 and self.spread is not None and self.spread <= self.max_spread

    def problems(self) -> list[str]:
        """One line per run that did not measure."""
        out = []
        for name, runs in zip(self.names, (self.runs_a, self.runs_b), strict=True):
            for i, run in enumerate(runs):
                for kind in ("unavailable", "error"):
                    if kind in run:
                        out.append(f"{name} run {i + 1}: {kind}: {run[kind]}")
        return out

    def median_of(self, side: int, key: str) -> float | None:
        """The median of ``key`` over side ``side``'s (0: A, 1: B) runs that report it."""
        values = [run[key] for run in (self.runs_a, self.runs_b)[side] if key in run]
        return statistics.median(values) if values else None

    def report(self, fmt: str = "{:.2f}") -> str:
        """Each pair's figures and ratio, then the median ratio with min and max, and a warning
        when the pairs disagree too much (or too few measured) to trust it."""
        a, b = self.names
        lines = []
        for i, (run_a, run_b) in enumerate(zip(self.runs_a, self.runs_b, strict=False)):
            va, vb = run_a.get(self.metric), run_b.get(self.metric)
            ratio = f"{va / vb:.2f}×" if va is not None and vb else "—"
            cells = [fmt.format(v) if v is not None else "—" for v in (va, vb)]
            lines.append(f"  pair {i + 1}: {a} {cells[0]}, {b} {cells[1]}, {a} / {b} = {ratio}")
        ratios = self.ratios
        if ratios:
            lines.append(
                f"{a} / {b}, {self.metric}: median {statistics.median(ratios):.2f}× over {len(ratios)} pairs "
                f"(min {min(ratios):.2f}×, max {max(ratios):.2f}×)"
            )
        else:
            lines.append(f"{a} / {b}, {self.metric}: no pair measured both sides")
        lines += [f"  {p}" for p in self.problems()]
        if ratios and not self.trustworthy:
            spread = self.spread
            reason = (
                f"only {len(ratios)} pair(s) measured"
                if len(ratios) < 3
                else f"the pair ratios spread {spread:.2f}× (max / min), more than {self.max_spread:.2f}×"
            )
            lines.append(
                f"WARNING: do not trust this ratio: {reason}; the machine's load changed between runs. "
                "Rerun with more pairs on a quieter machine."
            )
        return "\n".join(lines)


def run_pairs(
    argv_a: Sequence[str],
    argv_b: Sequence[str],
    metric: str,
    pairs: int = 3,
    names: tuple[str, str] = ("A", "B"),
    max_spread: float = 1.25,
    timeout: float | None = None,
    progress: bool = True,
) -> Comparison:
    """Run the two commands alternately, ``pairs`` times each (A B A B …), each in its own process.

    Args:
        argv_a: command line of configuration A (a child that calls :func:`emit`).
        argv_b: command line of configuration B.
        metric: the emitted figure compared; ratios are A/B of it (above 1: A's figure is larger).
        pairs: A/B pairs (at least 3: fewer cannot tell a burst of load from a difference).
        names: display names of A and B.
        max_spread: a max/min spread of the pair ratios above this is reported as untrustworthy.
        timeout: seconds allowed to each run.
        progress: print a line as each run ends.
    """
    if pairs < 3:
        raise ValueError(
            f"pairs must be >= 3 (a median of fewer pair ratios cannot ignore a burst), got {pairs}"
        )
    if max_spread < 1:
        raise ValueError(f"max_spread is a max/min ratio, >= 1; got {max_spread}")
    comparison = Comparison(names, metric, max_spread=max_spread)
    for i in range(pairs):
        for name, argv, runs in zip(
            names, (argv_a, argv_b), (comparison.runs_a, comparison.runs_b), strict=True
        ):
            result = run_once(argv, timeout)
            runs.append(result)
            if progress:
                value = result.get(metric)
                shown = f"{metric} {value:.4g}" if isinstance(value, int | float) else str(result)[:120]
                print(f"[pair {i + 1}/{pairs}] {name}: {shown}", flush=True)
        if "unavailable" in comparison.runs_b[-1] or "unavailable" in comparison.runs_a[-1]:
            break  # a missing library stays missing: no point in more pairs
    return comparison
