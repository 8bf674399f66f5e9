"""lit_pref's KTO module against TRL 1.16's ``KTOTrainer._compute_loss`` on the same log-probs.

Six unpaired rows (desirable and undesirable, different lengths), each with its mismatched
completion for the KL reference point z0 built as TRL builds it (completions rotated by one within
the batch). TRL's trainer is made with ``object.__new__`` and the attributes ``_compute_loss``
reads; its policy and reference are :class:`~parity.trl_fakes.FusedTable` models that return the
seeded float64 log-probs for both the labelled and the KL sequences. lit_pref's
:class:`~lit_pref.modules.kto.KTO` runs ``shared_step`` with its shared log-prob path returning the
same values. Loss, gradient, z0 and the logged rewards agree to 1e-6.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from parity.trl_fakes import (
    ATOL,
    FusedTable,
    accelerator,
    compute_loss,
    lit_logps,
    token_values,
    train_step_state,
)
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

from lit_pref.data.collate import Collator
from lit_pref.modules.kto import KTO
from lit_pref.types import CompletionLogps

LABELS = (True, False, True, True, False, False)
PROMPT_LENGTHS = (3, 5, 2, 4, 6, 2)
COMPLETION_LENGTHS = (4, 1, 7, 3, 2, 5)


def make_rows(kl_shift: float, seed: int = 0) -> dict[str, Any]:
    """Token ids and values; ``kl_shift`` moves the policy's KL log-probs (z0's sign) against the reference's."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 500, (n,), generator=g).tolist()

    prompts = [ids(n) for n in PROMPT_LENGTHS]
    completions = [ids(n) for n in COMPLETION_LENGTHS]
    kl_completions = [completions[-1], *completions[:-1]]  # TRL's rotation by one
    kl_lengths = [len(c) for c in kl_completions]
    theta = torch.cat(token_values(COMPLETION_LENGTHS, g)).requires_grad_()
    return {
        "prompts": prompts,
        "completions": completions,
        "kl_completions": kl_completions,
        "theta": theta,
        "policy": list(theta.split(COMPLETION_LENGTHS)),
        "ref": token_values(COMPLETION_LENGTHS, g),
        "policy_kl": [v + kl_shift / len(v) for v in token_values(kl_lengths, g)],
        "ref_kl": token_values(kl_lengths, g),
    }


def trl_kto(
    data: dict[str, Any], loss_type: str, beta: float, desirable_weight: float, undesirable_weight: float
):
    examples = [
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": label}
        for p, c, k, label in zip(
            data["prompts"], data["completions"], data["kl_completions"], LABELS, strict=True
        )
    ]
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
    policy = FusedTable(
        [(batch["input_ids"], data["policy"], None), (batch["KL_input_ids"], data["policy_kl"], None)]
    )
    reference = FusedTable(
        [(batch["input_ids"], data["ref"], None), (batch["KL_input_ids"], data["ref_kl"], None)]
    )
    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(
        model=policy,
        ref_model=reference,
        accelerator=accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        calculate_KL=loss_type == "kto",
        precompute_ref_logps=False,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        **train_step_state(),
    )
    return compute_loss(trainer, policy, batch)


def lit_kto(module: KTO, data: dict[str, Any]):
    rows = [
        {"prompt_input_ids": p, "completion_input_ids": c, "kl_completion_input_ids": k, "label": label}
        for p, c, k, label in zip(
            data["prompts"], data["completions"], data["kl_completions"], LABELS, strict=True
        )
    ]
    batch = Collator(pad_token_id=0)(rows)
    main, kl = id(batch["completion_input_ids"]), id(batch["kl_completion_input_ids"])
    policy = {main: lit_logps(data["policy"]), kl: lit_logps(data["policy_kl"])}
    reference = {main: lit_logps(data["ref"]), kl: lit_logps(data["ref_kl"])}

    def logps(model: torch.nn.Module, batch_: dict[str, Any], **kwargs: Any) -> CompletionLogps:
        assert model is module.policy
        return policy[id(batch_["completion_input_ids"])]

    def reference_logps(batch_: dict[str, Any], **kwargs: Any) -> CompletionLogps:
        return reference[id(batch_["completion_input_ids"])]

    module.logps = logps
    module.reference_logps = reference_logps
    return module.shared_step(batch, "train")


@pytest.mark.parametrize(
    ("loss_type", "beta", "desirable_weight", "undesirable_weight"),
    [
        ("kto", 0.1, 1.0, 1.0),
        ("kto", 0.5, 1.0, 1.0),
        ("kto", 0.5, 1.33, 1.0),
        ("kto", 0.5, 1.0, 2.0),
        ("apo_zero_unpaired", 0.5, 1.0, 1.0),
        ("apo_zero_unpaired", 0.5, 0.7, 1.4),
    ],
)
@pytest.mark.parametrize("kl_shift", [3.0, -3.0], ids=["z0>0", "z0-clamped"])
def test_kto_equals_trl(loss_type, beta, desirable_weight, undesirable_weight, kl_shift, tiny_lm_dir):
    data = make_rows(kl_shift)
    module = KTO(
        model_name_or_path=str(tiny_lm_dir), loss_type=loss_type, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
    )  # fmt: skip
    module.configure_model()
    lit_loss, metrics = lit_kto(module, data)
    trl_loss, trl_metrics = trl_kto(data, loss_type, beta, desirable_weight, undesirable_weight)
    torch.testing.assert_close(lit_loss, trl_loss, atol=ATOL, rtol=0)
    (lit_grad,) = torch.autograd.grad(lit_loss, data["theta"])
    (trl_grad,) = torch.autograd.grad(trl_loss, data["theta"])
    torch.testing.assert_close(lit_grad, trl_grad, atol=ATOL, rtol=0)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(float(metrics[key].detach().mean()), trl_metrics[key], atol=ATOL, rtol=0)
    if loss_type == "kto":
        torch.testing.assert_close(float(metrics["kl"]), trl_metrics["kl"], atol=ATOL, rtol=0)
        # The two shifts put z0 on either side of the clamp at 0.
        assert (trl_metrics["kl"] > 0.1) == (kl_shift > 0)
