"""Tiny DPO runs shared by the distributed script (``run_jobs.py``) and its single-process baselines.

A job is a plain dict, so the test can write a list of them to JSON for the script, and run the
same dict in-process (``strategy: single``) for the comparison. Every run is a few optimizer
steps on 8-10 rows of the offline toy task with the tiny 2-layer model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from lit_pref.callbacks.ref_sync import RefModelSync
from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.distributed import FSDP2Strategy, full_state_dict, is_sharded
from lit_pref.modules.dpo import DPO

DEFAULTS: dict[str, Any] = {
    "strategy": "single",  # single | ddp | fsdp
    "devices": 1,
    "samples": 8,
    "val_samples": 0,
    "batch": 2,  # per rank
    "steps": 3,
    "lr": 5.0,
    "optimizer": "sgd",
    "clip": 0.05,
    "ref_sync": None,  # mixup alpha of a RefModelSync every step
    "precompute": False,
    "lora": False,
    "gc": False,
    "precision": "32-true",
    "export": False,
    "checkpoint": False,  # a checkpoint after every step, in <root>/ckpt
    "resume": None,  # a checkpoint path to resume from
}

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


class RecordingDPO(DPO):
    """DPO that keeps the metrics it computes at every optimizer step (already reduced over ranks)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, float]] = []
        self.rows: list[list[int]] = []  # the row ids of every training micro-batch of this rank

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.rows.append(batch["index"].tolist())

    def check_alarms(self, values: dict[str, torch.Tensor]) -> None:
        self.history.append({k: float(v) for k, v in values.items()})
        super().check_alarms(values)


def job_settings(job: dict[str, Any]) -> dict[str, Any]:
    unknown = set(job) - set(DEFAULTS) - {"name"}
    if unknown:
        raise ValueError(f"unknown job settings {sorted(unknown)}")
    return DEFAULTS | job


def build(
    job: dict[str, Any], model_dir: str | Path, root: str | Path
) -> tuple[Trainer, RecordingDPO, PreferenceDataModule]:
    """The trainer, module and data of one job (``root``: scratch directory of this job)."""
    job = job_settings(job)
    root = Path(root)
    if job["optimizer"] == "sgd":
        optimizer = lambda params: torch.optim.SGD(params, lr=job["lr"])  # noqa: E731
    else:
        optimizer = lambda params: torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0)  # noqa: E731
    module = RecordingDPO(
        model_name_or_path=str(model_dir),
        dtype="float32",
        peft=LORA if job["lora"] else None,
        gradient_checkpointing=job["gc"],
        precompute_ref_logps=job["precompute"],
        ref_cache_dir=str(root / "ref_cache"),
        optimizer=optimizer,
        output_dir=str(root / "export") if job["export"] else None,
        alarm_after_steps=0,
    )
    data = PreferenceDataModule(
        tokenizer_name_or_path=str(model_dir),
        max_train_samples=job["samples"],
        max_val_samples=job["val_samples"] or None,
        val_split="test" if job["val_samples"] else None,
        batch_size=job["batch"],
    )
    strategy: Any = "auto"
    if job["strategy"] == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    elif job["strategy"] == "fsdp":
        strategy = FSDP2Strategy()
    callbacks: list[Any] = [RefModelSync(sync_steps=1, mixup_alpha=job["ref_sync"])] if job["ref_sync"] else []
    if job["checkpoint"]:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1))
    trainer = Trainer(
        accelerator="cpu",
        devices=job["devices"],
        strategy=strategy,
        precision=job["precision"],
        max_steps=job["steps"],
        gradient_clip_val=job["clip"],
        limit_val_batches=1.0 if job["val_samples"] else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=job["checkpoint"],
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(root),
    )
    return trainer, module, data


def run(job: dict[str, Any], model_dir: str | Path, root: str | Path) -> dict[str, Any]:
    """Fit one job; every rank returns what it saw, global rank zero also the full weights.

    Gathering the full weights is a collective under FSDP2, so every rank calls it.
    """
    torch.manual_seed(0)
    trainer, module, data = build(job, model_dir, root)
    trainer.fit(module, datamodule=data, ckpt_path=job_settings(job)["resume"])
    result: dict[str, Any] = {
        "name": job.get("name"),
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "history": module.history,
        "rows": module.rows,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "sharded": {},
    }
    networks = {"policy": module.policy, "reference": module.reference.network}
    for name, network in networks.items():
        if network is None:
            continue
        result["sharded"][name] = is_sharded(network)
        # Collective under FSDP2; rank zero alone gets the tensors.
        result[f"{name}_state"] = full_state_dict(network)
    if module.reference.network is not None and is_sharded(module.policy):
        # The reference is sharded by the same function: identical placements and local shapes,
        # so TR-DPO's mixing is a purely local operation on matching shards.
        pairs = RefModelSync.parameter_pairs(module) if job.get("ref_sync") else []
        result["same_placements"] = all(
            p.placements == r.placements and p.to_local().shape == r.to_local().shape for _, p, r in pairs
        )
        result["local_fraction"] = (
            max(p.to_local().numel() / p.numel() for _, p, _ in pairs) if pairs else None
        )
    if job.get("precompute"):
        result["ref_table"] = module.ref_logp_table.tables["train"][1].cpu()
    return result


def sharded_model_checks(model_dir: str | Path) -> dict[str, Any]:
    """``shard_causal_lm`` on its own, with untied and tied input/output embeddings.

    * Gradients: each rank scores half of 4 prompts (2 completions each) through
      ``completion_logps`` (decoder and head called separately, chunked head); the reduced
      sharded gradients must equal one unsharded process's gradients on all 4.
    * Generation: rank r asks for 2 + 4r new tokens. Every forward of a sharded model is a
      collective, so rank 0, done after 2 tokens, must keep taking part until rank 1 has its 6
      (as when one rank's samples all hit EOS early).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from lit_pref.distributed import shard_causal_lm
    from lit_pref.ops import completion_logps

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, 100, (4, 5), generator=g)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[0, :2] = 0
    completions = torch.randint(5, 100, (8, 6), generator=g)
    completion_mask = torch.ones_like(completions)
    completion_mask[1, 4:] = 0

    def loss(model: torch.nn.Module, rows: list[int]) -> torch.Tensor:
        pairs = [2 * r + j for r in rows for j in (0, 1)]
        out = completion_logps(
            model, prompts[rows], prompt_mask[rows], completions[pairs], completion_mask[pairs], chunk_size=4
        )
        return out.token_logps.sum() / len(rows)

    result: dict[str, Any] = {"rank": rank}
    for tied in (False, True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, tie_word_embeddings=tied)
        if tied:
            model.tie_weights()  # the saved checkpoint is untied: share the input embedding
        loss(model, [0, 1, 2, 3]).backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        shard_causal_lm(model, mesh)
        half = 4 // world
        loss(model, list(range(rank * half, (rank + 1) * half))).backward()
        got = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # FSDP2 averages over ranks
        name = "tied" if tied else "untied"
        result[f"{name}_tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        result[f"{name}_sharded"] = is_sharded(model)
        result[f"{name}_grad_diff"] = max(float((got[n] - expected[n]).abs().max()) for n in expected)
        result[f"{name}_grad_max"] = max(float(t.abs().max()) for t in expected.values())
        prompt = torch.tensor([[1, 20, 30, 40]])
        new = 2 + 4 * rank
        out = model.eval().generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
            do_sample=False,
        )  # fmt: skip
        result[f"{name}_new_tokens"] = out.shape[1] - prompt.shape[1]
    return result


def run_rl(kind: str, model_dir: str | Path, root: str | Path) -> dict[str, Any]:
    """One step of an online module under FSDP2: sampling from the sharded policy, sharded reference
    (and PPO's value network) scoring, manual optimizer steps."""
    from lit_pref.modules import GRPO, PPO, RFT, OnlineDPO

    torch.manual_seed(0)
    common = {
        "model_name_or_path": str(model_dir),
        "rewards": "lit_pref.tasks:mood_reward",
        "max_new_tokens": 4,
        "optimizer": lambda params: torch.optim.AdamW(params, lr=1e-3),
    }
    modules = {
        "grpo": lambda: GRPO(num_generations=2, **common),
        "ppo": lambda: PPO(num_ppo_epochs=1, **common),
        "online_dpo": lambda: OnlineDPO(num_generations=2, **common),
        "rft": lambda: RFT(num_generations=2, **common),
    }
    module = modules[kind]()
    data = PreferenceDataModule(
        "lit_pref.tasks:mood_prompts", batch_size=2, max_train_samples=4, val_split=None
    )
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    networks = {
        "policy": module.policy,
        "reference": module.reference.network,
        "value": getattr(module, "value_model", None),
    }
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "sharded": {name: is_sharded(net) for name, net in networks.items() if net is not None},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
