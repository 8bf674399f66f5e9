"""Distributed training on CPU: 2 gloo processes under DDP and FSDP2 against a single process.

One subprocess (``tests/dist/run_jobs.py``, relaunched by Lightning for rank 1) runs every
distributed job back to back, so process start-up is paid once; the single-process baselines run
in this process. Each job is a few optimizer steps of DPO on the tiny 2-layer model.

Equivalence: per-rank batch 2 on 2 ranks ≡ batch 4 in one process. The training loader's
``ResumableSampler`` is a ``DistributedSampler`` seeded alike in one process and on each rank,
so each step's global batch is the same 4 rows. Plain SGD
and gradient-norm clipping (so the norm must be global across ranks and shards), and TR-DPO
syncing the reference after every step (so a wrong mix under sharding changes the later losses
as well as the final reference weights).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))

from dist_jobs import LORA, run  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 1e-6

RESUME = {"samples": 12, "batch": 2, "optimizer": "adamw", "lr": 5e-3, "clip": 1.0}
RESUME_PARTS = {"straight": {"steps": 4}, "first": {"steps": 2, "checkpoint": True}, "second": {"steps": 4, "resume": "first"}}
MAIN = {"samples": 8, "val_samples": 5, "batch": 2, "steps": 3, "ref_sync": 0.5}
JOBS = [
    # The first job starts rank 1 (Lightning relaunches this script); the rest reuse both ranks.
    {"name": "ddp", "strategy": "ddp", "devices": 2, **MAIN},
    {"name": "fsdp", "strategy": "fsdp", "devices": 2, "export": True, **MAIN},
    {"name": "metrics", "kind": "metrics"},
    {"name": "fsdp_precompute", "strategy": "fsdp", "devices": 2, "precompute": True, "steps": 1},
    # Combinations, on 9 rows: 5 per rank after the sampler pads one, last batch of 1.
    {"name": "ddp_lora_gc", "strategy": "ddp", "devices": 2, "samples": 9, "lora": True, "gc": True,
     "optimizer": "adamw", "lr": 1e-2, "clip": 1.0},
    {"name": "fsdp_gc", "strategy": "fsdp", "devices": 2, "samples": 9, "gc": True, "optimizer": "adamw",
     "lr": 1e-3, "clip": 1.0},
    {"name": "fsdp_lora_gc", "strategy": "fsdp", "devices": 2, "samples": 9, "lora": True, "gc": True,
     "optimizer": "adamw", "lr": 1e-2, "clip": 1.0, "export": True},
    {"name": "ddp_bf16", "strategy": "ddp", "devices": 2, "precision": "bf16-mixed", "steps": 2,
     "optimizer": "adamw", "lr": 1e-3, "clip": 1.0},
    {"name": "fsdp_bf16", "strategy": "fsdp", "devices": 2, "precision": "bf16-mixed", "steps": 2,
     "optimizer": "adamw", "lr": 1e-3, "clip": 1.0},
    # shard_causal_lm on its own (gradients, tied embeddings, generation), then GRPO / PPO.
    {"name": "shard", "kind": "shard"},
    {"name": "grpo", "kind": "grpo"},
    {"name": "ppo", "kind": "ppo"},
    {"name": "online_dpo", "kind": "online_dpo"},
    {"name": "rft", "kind": "rft"},
    # Resume inside an epoch (12 rows: 3 batches per rank and epoch): straight vs 2 steps + 2 resumed.
    *[{"name": f"resume_{part}", "strategy": "ddp", "devices": 2, **RESUME, **settings} for part, settings in RESUME_PARTS.items()],
]  # fmt: skip
CLI_STRATEGIES = ("ddp", "fsdp")


def cli_args(strategy: str, model_dir: Path, root: Path) -> list[str]:
    """``lit-pref fit --config configs/dpo.yaml --config configs/strategies/<strategy>.yaml`` on 2 CPUs."""
    return [
        "fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "strategies" / f"{strategy}.yaml"),
        f"--model.model_name_or_path={model_dir}", f"--model.output_dir={root / 'export'}",
        f"--model.ref_cache_dir={root / 'cache'}", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.max_steps=2", "--trainer.val_check_interval=1", "--trainer.logger=false",
        f"--trainer.default_root_dir={root}", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.enable_progress_bar=false", "--data.max_train_samples=8", "--data.max_val_samples=4",
        "--data.batch_size=2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dist_runs(tiny_lm_dir, tmp_path_factory) -> dict[str, list[dict]]:
    """Every distributed job, run once on 2 gloo processes; ``name → [rank 0 result, rank 1 result]``."""
    root = tmp_path_factory.mktemp("dist")
    jobs = [*JOBS]
    for i, job in enumerate(jobs):
        if job.get("resume"):  # the name of the job whose step-2 checkpoint it resumes
            jobs[i] = job | {"resume": str(root / f"resume_{job['resume']}" / "ckpt" / "epoch=0-step=2.ckpt")}
    for strategy in CLI_STRATEGIES:
        name = f"cli_{strategy}"
        jobs.append({"name": name, "cli": cli_args(strategy, tiny_lm_dir, root / name)})
    plan = root / "plan.json"
    plan.write_text(json.dumps({"model_dir": str(tiny_lm_dir), "root": str(root), "jobs": jobs}))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LIT_PREF_DEBUG": "1"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run(
        [sys.executable, "run_jobs.py", str(plan)],
        cwd=DIST,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = {}
    for job in jobs:
        results[job["name"]] = [
            torch.load(root / job["name"] / f"result.rank{rank}.pt", weights_only=False) for rank in (0, 1)
        ]
    results["root"] = root  # type: ignore[assignment]
    return results


@pytest.fixture(scope="module")
def single(tiny_lm_dir, tmp_path_factory) -> dict:
    """The main job in one process with the same global batch (4 = 2 ranks × 2)."""
    job = {"name": "single", **MAIN, "batch": 4}
    return run(job, tiny_lm_dir, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def initial(tiny_lm_dir) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).state_dict()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ----------------------------------------------------------------- equivalences
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, dist_runs, single, initial):
    """Same per-step losses and metrics on every rank, same final policy and TR-DPO reference."""
    rank0, rank1 = dist_runs[strategy]
    assert rank0["world_size"] == 2 and rank0["global_step"] == single["global_step"] == 3
    # Metrics are reduced over the ranks: both ranks computed exactly the same values.
    assert rank0["history"] == rank1["history"]
    assert len(rank0["history"]) == len(single["history"]) == 3
    # Each step's global batch: the single process's batch, split over the ranks.
    for step, rows in enumerate(single["rows"]):
        assert sorted(rank0["rows"][step] + rank1["rows"][step]) == sorted(rows)
    assert sorted(single["rows"][0] + single["rows"][1]) == list(range(8))  # one epoch, then the next
    loss_diff = 0.0
    for got, want in zip(rank0["history"], single["history"], strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=LOSS_ATOL), key
        loss_diff = max(loss_diff, abs(got["train/loss"] - want["train/loss"]))
    losses = [h["train/loss"] for h in single["history"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0] - 1e-3
    policy_diff = max_diff(rank0["policy_state"], single["policy_state"])
    reference_diff = max_diff(rank0["reference_state"], single["reference_state"])
    print(
        f"{strategy}: max |Δloss| {loss_diff:.2e}, |Δpolicy| {policy_diff:.2e}, |Δreference| {reference_diff:.2e}"
    )
    assert policy_diff < WEIGHT_ATOL and reference_diff < WEIGHT_ATOL
    # Both moved far beyond the tolerance (the reference through the TR-DPO syncs).
    assert max_diff(single["policy_state"], initial) > 1e-2
    assert max_diff(single["reference_state"], initial) > 1e-2
    assert (
        rank1["policy_state"] == {} if strategy == "fsdp" else rank1["policy_state"].keys() == initial.keys()
    )


def test_fsdp_shards_reference_like_the_policy(dist_runs):
    rank0, _ = dist_runs["fsdp"]
    assert rank0["sharded"] == {"policy": True, "reference": True}
    assert dist_runs["ddp"][0]["sharded"] == {"policy": False, "reference": False}
    # TR-DPO mixes matching local shards: same placements, each rank holding half of every weight.
    assert rank0["same_placements"] is True
    assert rank0["local_fraction"] == pytest.approx(0.5)


def test_fsdp_export_gathers_the_full_policy(dist_runs, single):
    rank0, _ = dist_runs["fsdp"]
    exported = AutoModelForCausalLM.from_pretrained(dist_runs["root"] / "fsdp" / "export").state_dict()
    assert max_diff(exported, rank0["policy_state"]) == 0.0
    assert max_diff(exported, single["policy_state"]) < WEIGHT_ATOL


def test_validation_on_uneven_data_is_reduced_over_ranks(dist_runs):
    """5 validation rows on 2 ranks (the sampler pads to 6): no hang, every rank logs the same
    global means, and DDP and FSDP2 agree."""
    ddp, fsdp = dist_runs["ddp"], dist_runs["fsdp"]
    val = {k: v for k, v in ddp[0]["callback_metrics"].items() if k.startswith("val/")}
    assert "val/loss" in val and all(math.isfinite(v) for v in val.values())
    for result in (ddp[1], fsdp[0], fsdp[1]):
        for key, value in val.items():
            assert result["callback_metrics"][key] == pytest.approx(value, abs=LOSS_ATOL), key


def test_metric_groups_agree_on_keys_across_ranks(dist_runs):
    for result in dist_runs["metrics"]:
        assert result["first"] == {"train/a": 3.0, "train/b": 2.0, "train/c": 5.0}
        assert result["second"] == {}


def test_ddp_resume_inside_an_epoch_repeats_the_straight_run(dist_runs):
    """2 ranks: stopped at step 2 of 3 per epoch and resumed to 4, each rank reads the same rows and
    logs the same losses as the straight run, and the weights end equal."""
    straight, first, second = (dist_runs[f"resume_{part}"] for part in RESUME_PARTS)
    for rank in (0, 1):
        assert second[rank]["global_step"] == 4
        assert second[rank]["rows"] == straight[rank]["rows"][2:]
        assert first[rank]["rows"] == straight[rank]["rows"][:2]
        resumed_losses = [h["train/loss"] for h in second[rank]["history"]]
        straight_losses = [h["train/loss"] for h in straight[rank]["history"][2:]]
        assert resumed_losses == pytest.approx(straight_losses, abs=1e-6)
    assert straight[0]["rows"] != straight[1]["rows"]  # each rank reads its own shard
    assert max_diff(second[0]["policy_state"], straight[0]["policy_state"]) <= WEIGHT_ATOL
    assert max_diff(second[0]["policy_state"], first[0]["policy_state"]) > 1e-3  # the resumed steps moved it


def test_fsdp_precomputed_reference_matches_the_live_reference(dist_runs, tiny_lm_dir):
    """Reference log-probs precomputed in on_fit_start, after FSDP2 has sharded the policy (the
    starting policy is the ``copy`` reference), equal the unsharded single-process values."""
    from lit_pref.data.datamodule import PreferenceDataModule
    from lit_pref.modules.dpo import DPO

    rank0, rank1 = dist_runs["fsdp_precompute"]
    assert rank0["global_step"] == 1 and rank0["sharded"] == {"policy": True}
    assert torch.equal(rank0["ref_table"], rank1["ref_table"])
    module = DPO(model_name_or_path=str(tiny_lm_dir))
    module.configure_model()
    data = PreferenceDataModule(
        tokenizer_name_or_path=str(tiny_lm_dir),
        target="paired",
        max_train_samples=8,
        val_split=None,
        batch_size=4,
    )
    data.setup("fit")
    for batch in data.sequential_dataloader("train"):
        expected = module.reference_values(batch)
        torch.testing.assert_close(rank0["ref_table"][batch["index"]], expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------- combinations
@pytest.mark.parametrize("name", ["ddp_lora_gc", "fsdp_gc", "fsdp_lora_gc", "ddp_bf16", "fsdp_bf16"])
def test_combinations_train(name, dist_runs, initial):
    """LoRA, gradient checkpointing (non-reentrant) and bf16-mixed under each strategy: finite
    losses at every step, trainable weights moved, frozen ones did not; uneven data (9 rows)."""
    rank0, rank1 = dist_runs[name]
    history = rank0["history"]
    assert history == rank1["history"]
    assert len(history) == rank0["global_step"] and all(math.isfinite(h["train/loss"]) for h in history)
    policy = rank0["policy_state"]
    assert rank0["sharded"]["policy"] == name.startswith("fsdp")
    if "lora" in name:
        assert "reference_state" not in rank0  # adapter_disabled: the policy's base is the reference
        lora_b = [k for k in policy if "lora_B" in k]
        assert len(lora_b) == 4 and all(policy[k].abs().max() > 1e-4 for k in lora_b)
        for key, value in policy.items():
            if "lora_" not in key:
                base = key.replace("base_model.model.", "").replace(".base_layer", "")
                assert torch.equal(value, initial[base]), key
    else:
        assert max_diff(rank0["reference_state"], initial) == 0.0
        moved = sum(not torch.equal(policy[k], initial[k]) for k in initial)
        assert moved == len(initial)


@pytest.mark.parametrize("combination", ["lora_gc", "bf16"])
def test_ddp_and_fsdp_agree_on_combinations(combination, dist_runs):
    """The same run under DDP and FSDP2 (LoRA + checkpointing; bf16-mixed autocast): same rows,
    same losses, same final trainable weights."""
    ddp, fsdp = dist_runs[f"ddp_{combination}"][0], dist_runs[f"fsdp_{combination}"][0]
    assert ddp["rows"] == fsdp["rows"]
    for a, b in zip(ddp["history"], fsdp["history"], strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=LOSS_ATOL)
    assert max_diff(ddp["policy_state"], fsdp["policy_state"]) < 1e-5


def test_fsdp_lora_export_is_the_merged_policy(dist_runs, tiny_lm_dir):
    """Exported under FSDP2 with merge_lora: the merge of the gathered weights."""
    from peft import LoraConfig, get_peft_model

    rank0, _ = dist_runs["fsdp_lora_gc"]
    rebuilt = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), LoraConfig(**LORA))
    rebuilt.load_state_dict(rank0["policy_state"])
    merged = rebuilt.merge_and_unload().state_dict()
    exported = AutoModelForCausalLM.from_pretrained(
        dist_runs["root"] / "fsdp_lora_gc" / "export"
    ).state_dict()
    assert max_diff(exported, merged) < 1e-6


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_shard_causal_lm(name, dist_runs):
    """Sharded gradients through the decoder / head calls of completion_logps equal one process's
    (tied embeddings: one group for decoder and head); generation that stops at different steps
    on each rank keeps every collective matched (transformers' synced_gpus, turned on by
    shard_causal_lm)."""
    for result in dist_runs["shard"]:
        assert result[f"{name}_sharded"] and result[f"{name}_tied"] == (name == "tied")
        assert result[f"{name}_grad_diff"] < 2e-6 < 1e-2 < result[f"{name}_grad_max"]
    assert [r[f"{name}_new_tokens"] for r in dist_runs["shard"]] == [2, 6]


@pytest.mark.parametrize("kind", ["grpo", "ppo", "online_dpo", "rft"])
def test_online_algorithms_step_under_fsdp(kind, dist_runs):
    """A step of each online module (sampling, reference and value scoring, manual optimizer step)
    with every network sharded, and the same reduced metrics on both ranks."""
    expected = {"policy": True} | ({} if kind == "rft" else {"reference": True}) | ({"value": True} if kind == "ppo" else {})
    for result in dist_runs[kind]:
        assert result["global_step"] == 1 and result["sharded"] == expected
        assert math.isfinite(result["metrics"]["train/loss"])
    rank0, rank1 = (r["metrics"] for r in dist_runs[kind])
    assert rank0.keys() == rank1.keys()
    assert all(rank0[k] == rank1[k] or (math.isnan(rank0[k]) and math.isnan(rank1[k])) for k in rank0)


# ------------------------------------------------------------------ the YAMLs
@pytest.mark.parametrize("strategy", CLI_STRATEGIES)
def test_strategy_yaml_trains_through_the_cli(strategy, dist_runs):
    """``lit-pref fit --config configs/dpo.yaml --config configs/strategies/<s>.yaml`` on 2 CPU
    processes: trains, checkpoints (a sharded checkpoint directory under FSDP2) and exports."""
    root = dist_runs["root"] / f"cli_{strategy}"
    assert AutoModelForCausalLM.from_pretrained(root / "export") is not None
    assert (root / "ckpt" / "last.ckpt").exists()


@pytest.mark.parametrize(
    ("name", "class_path", "expected"),
    [
        ("ddp.yaml", None, {}),
        ("fsdp.yaml", "lit_pref.distributed.FSDP2Strategy", {"data_parallel_size": "auto"}),
        ("deepspeed_zero2.yaml", "lightning.pytorch.strategies.DeepSpeedStrategy", {"stage": 2}),
        ("deepspeed_zero3.yaml", "lightning.pytorch.strategies.DeepSpeedStrategy", {"stage": 3}),
    ],
)
def test_strategy_yamls_parse(name, class_path, expected, capsys, monkeypatch):
    """Every strategy YAML composes with an algorithm YAML; the DeepSpeed ones (CUDA only) are
    checked by parsing, and by building the strategy when the optional ``deepspeed`` is installed."""
    import yaml

    import lit_pref.cli as cli_module

    monkeypatch.setattr(sys, "argv", ["lit-pref"])
    args = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "strategies" / name)]
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    strategy = trainer["strategy"]
    if class_path is None:
        assert strategy == "ddp"
        return
    assert strategy["class_path"] == class_path
    assert expected.items() <= strategy["init_args"].items()
    if "deepspeed" in name:
        assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
        pytest.importorskip("deepspeed")
        from lightning.pytorch.strategies import DeepSpeedStrategy
        from transformers.integrations import is_deepspeed_zero3_enabled

        from lit_pref.distributed import zero3_loading

        built = DeepSpeedStrategy(**strategy["init_args"])
        assert built.config["zero_optimization"]["stage"] == expected["stage"]
        # Under ZeRO-3, from_pretrained must know that parameters are partitioned as created.
        with zero3_loading(built):
            assert is_deepspeed_zero3_enabled() == (expected["stage"] == 3)
        assert not is_deepspeed_zero3_enabled()


def test_fsdp2_strategy_refuses_tensor_parallelism():
    from lit_pref.distributed import FSDP2Strategy

    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        FSDP2Strategy(tensor_parallel_size=2)
