"""Run a list of tiny DPO jobs on 2 CPU processes (gloo): ``python run_jobs.py PLAN.json``.

Launched once with plain ``python``; the first ``Trainer.fit`` (``devices=2``) relaunches this
script for rank 1, as Lightning does for any script, and the later jobs reuse both processes and
the process group. Each rank writes ``<root>/<job>/result.rank<R>.pt`` per job.

The plan: ``{"model_dir": ..., "root": ..., "jobs": [{"name": ..., "strategy": "ddp" | "fsdp",
...}, ...]}`` with the settings of :data:`dist_jobs.DEFAULTS`.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", ".*does not have many workers.*")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_jobs import run, run_rl, sharded_model_checks  # noqa: E402

from lit_pref import cli  # noqa: E402
from lit_pref.metrics import MetricGroup  # noqa: E402


def uneven_metrics() -> dict:
    """Ranks that updated different metrics still compute together (no hang, global means).

    Rank 0 sees ``a`` twice and ``b``; rank 1 sees ``a`` and ``c`` (created in a different
    order): every rank gets ``a``, ``b`` and ``c`` averaged over every update of every rank.
    """
    rank = dist.get_rank()
    group = MetricGroup("train/")
    if rank == 0:
        group.update({"b": torch.tensor([1.0, 3.0]), "a": torch.tensor([1.0, 2.0])})
    else:
        group.update({"c": torch.tensor([5.0]), "a": torch.tensor([6.0])})
    first = {k: float(v) for k, v in group.compute().items()}
    second = {k: float(v) for k, v in group.compute().items()}  # nothing updated since: empty
    return {"rank": rank, "first": first, "second": second}


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    for job in plan["jobs"]:
        root = Path(plan["root"]) / job["name"]
        root.mkdir(parents=True, exist_ok=True)
        if "cli" in job:  # the shipped YAMLs through ``lit-pref fit``
            cli.main(job["cli"])
            result = {"rank": dist.get_rank()}
        elif job.get("kind") == "metrics":
            result = uneven_metrics()
        elif job.get("kind") == "shard":
            result = sharded_model_checks(plan["model_dir"])
        elif job.get("kind") in ("grpo", "ppo", "online_dpo", "rft"):
            result = run_rl(job["kind"], plan["model_dir"], root)
        else:
            result = run(job, plan["model_dir"], root)
        torch.save(result, root / f"result.rank{result['rank']}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
