"""lit_pref's DPO module against TRL 1.16's ``DPOTrainer._compute_loss`` on the same log-probs.

Both sides see the same seeded float64 per-token log-probs of five prompt/chosen/rejected rows of
different lengths (policy, reference, and WPO's log Σp²):

* TRL: ``DPOTrainer`` built with ``object.__new__`` (no ``__init__``), with the attributes
  ``_compute_loss`` reads set from the configuration, and :class:`~parity.trl_fakes.FusedTable`
  as policy and reference models; the batch comes from TRL's own ``DataCollatorForPreference``.
* lit_pref: a real :class:`~lit_pref.modules.dpo.DPO` on the tiny model, whose shared log-prob
  path (``module.logps``) returns the same values in lit_pref's layout; ``shared_step`` then runs
  unchanged (``pair_logps``, the reference path, ``dpo_loss``, the metrics).

Equal to 1e-6 (float64: in practice ~1e-15): the loss, its gradient with respect to every policy
log-prob, and the logged rewards. Where lit_pref deliberately differs, the test asserts the
documented relation instead (``docs/trl_migration.md``). The last test runs both libraries'
real log-prob paths on the tiny model, which both compute in float32.
"""

from __future__ import annotations

import copy
import itertools
import math
import types
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from parity.trl_fakes import (
    ATOL,
    DTYPE,
    FusedTable,
    accelerator,
    compute_loss,
    lit_logps,
    token_values,
    train_step_state,
)
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from lit_pref.data.collate import Collator
from lit_pref.losses.dpo import DPO_LOSS_TYPES
from lit_pref.modules.dpo import DPO
from lit_pref.types import CompletionLogps

PROMPT_LENGTHS = (3, 5, 2, 4, 6)
CHOSEN_LENGTHS = (4, 1, 7, 3, 2)
REJECTED_LENGTHS = (2, 6, 3, 3, 5)


@dataclass
class Pairs:
    """Token ids and per-token values of a batch of pairs; ``theta`` is the leaf all policy values view."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    policy_chosen: list[torch.Tensor]
    policy_rejected: list[torch.Tensor]
    ref_chosen: list[torch.Tensor]
    ref_rejected: list[torch.Tensor]
    sq_chosen: list[torch.Tensor]
    sq_rejected: list[torch.Tensor]
    theta: torch.Tensor

    def swapped(self) -> Pairs:
        return replace(
            self,
            chosen=self.rejected, rejected=self.chosen,
            policy_chosen=self.policy_rejected, policy_rejected=self.policy_chosen,
            ref_chosen=self.ref_rejected, ref_rejected=self.ref_chosen,
            sq_chosen=self.sq_rejected, sq_rejected=self.sq_chosen,
        )  # fmt: skip

    def as_dtype(self, dtype: torch.dtype) -> Pairs:
        """The same values in ``dtype``, with a new leaf."""
        theta = self.theta.detach().to(dtype).requires_grad_()
        policy = list(theta.split([*CHOSEN_LENGTHS, *REJECTED_LENGTHS]))
        cast = [[v.detach().to(dtype) for v in rows] for rows in (self.ref_chosen, self.ref_rejected)]
        sq = [[v.detach().to(dtype) for v in rows] for rows in (self.sq_chosen, self.sq_rejected)]
        return replace(
            self, theta=theta, policy_chosen=policy[: len(CHOSEN_LENGTHS)], policy_rejected=policy[len(CHOSEN_LENGTHS) :],
            ref_chosen=cast[0], ref_rejected=cast[1], sq_chosen=sq[0], sq_rejected=sq[1],
        )  # fmt: skip


def make_pairs(seed: int = 1) -> Pairs:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 500, (n,), generator=g).tolist()

    prompt = [ids(n) for n in PROMPT_LENGTHS]
    chosen = [ids(n) for n in CHOSEN_LENGTHS]
    rejected = [ids(n) for n in REJECTED_LENGTHS]
    lengths = [*CHOSEN_LENGTHS, *REJECTED_LENGTHS]
    theta = torch.cat(token_values(lengths, g)).requires_grad_()
    policy = list(theta.split(lengths))
    # Independent of the policy, so that the policy's and the reference's per-pair margins rank the pairs
    # differently (with the same ranking, AOT's sorted pairing would be the identity and AOT = DPO).
    ref = token_values(lengths, g)
    # log Σ_v p_v² ≥ log max_v p_v² ≥ 2·log p(y_t) would need the real vocabulary; any values below 0 do.
    sq = [-(0.05 + torch.rand(n, generator=g, dtype=DTYPE)) for n in lengths]
    b = len(CHOSEN_LENGTHS)
    return Pairs(prompt, chosen, rejected, policy[:b], policy[b:], ref[:b], ref[b:], sq[:b], sq[b:], theta)


def interleave(chosen: list[Any], rejected: list[Any]) -> list[Any]:
    return [row for pair in zip(chosen, rejected, strict=True) for row in pair]


# ------------------------------------------------------------------------------------------ TRL


def trl_dpo(
    pairs: Pairs, config: dict[str, Any], *, ref_sums: tuple[torch.Tensor, torch.Tensor] | None = None
):
    """TRL's loss and last logged metrics. ``ref_sums`` replaces the reference model by precomputed
    reference log-probs (TRL's ``precompute_ref_log_probs`` path)."""
    examples = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected, strict=True)
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    use_weighting = config.get("use_weighting", False)
    sq = pairs.sq_chosen + pairs.sq_rejected if use_weighting else None
    policy = FusedTable([(batch["input_ids"], pairs.policy_chosen + pairs.policy_rejected, sq)])
    reference = FusedTable([(batch["input_ids"], pairs.ref_chosen + pairs.ref_rejected, None)])
    if ref_sums is not None:
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_sums
    loss_type = config.get("loss_type", ["sigmoid"])
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=policy,
        ref_model=reference,
        accelerator=accelerator(),
        args=types.SimpleNamespace(
            gradient_checkpointing_kwargs=None, discopop_tau=config.get("discopop_tau", 0.05)
        ),
        beta=config.get("beta", 0.1),
        loss_types=[loss_type] if isinstance(loss_type, str) else list(loss_type),
        loss_weights=config.get("loss_weights")
        or [1.0] * (1 if isinstance(loss_type, str) else len(loss_type)),
        label_smoothing=config.get("label_smoothing", 0.0),
        f_divergence_type=config.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=config.get("f_alpha_divergence_coef", 0.5),
        use_weighting=use_weighting,
        ld_alpha=config.get("ld_alpha"),
        precompute_ref_logps=ref_sums is not None,
        **train_step_state(),
    )
    return compute_loss(trainer, policy, batch)


# ------------------------------------------------------------------------------------- lit_pref


@pytest.fixture(scope="module")
def dpo_module(tiny_lm_dir):
    """``DPO(**config)`` on the tiny model with its networks built (policy and a frozen copy)."""

    def build(**config: Any) -> DPO:
        module = DPO(model_name_or_path=str(tiny_lm_dir), **config)
        module.configure_model()
        assert module.reference.network is not None
        return module

    return build


def lit_dpo(module: DPO, pairs: Pairs):
    """``module.shared_step`` with the shared log-prob path returning ``pairs``' values."""
    rows = [
        {"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r}
        for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected, strict=True)
    ]
    batch = Collator(pad_token_id=0)(rows)
    sq = interleave(pairs.sq_chosen, pairs.sq_rejected)
    policy = lit_logps(interleave(pairs.policy_chosen, pairs.policy_rejected), sq)
    reference = lit_logps(interleave(pairs.ref_chosen, pairs.ref_rejected))

    def logps(model: torch.nn.Module, batch_: dict[str, Any], **kwargs: Any) -> CompletionLogps:
        assert model is module.policy and batch_["completion_input_ids"] is batch["completion_input_ids"]
        return policy

    def reference_logps(batch_: dict[str, Any], **kwargs: Any) -> CompletionLogps:
        assert batch_["completion_input_ids"] is batch["completion_input_ids"]
        return reference

    module.logps = logps
    module.reference_logps = reference_logps
    loss, metrics = module.shared_step(batch, "train")
    return loss, metrics


def grad(loss: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, pairs.theta)
    return g


def close(actual: Any, expected: Any, atol: float = ATOL, rtol: float = 0.0) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------- exact parity

# lit_pref arguments; TRL gets the same values (its loss_type list, weights, ε, β …).
SINGLE = [
    {"loss_type": name, **({"label_smoothing": 1e-3} if name == "exo_pair" else {})}
    for name in DPO_LOSS_TYPES
    if name not in ("bco_pair", "sft")  # documented differences, tested below
]
CASES = [
    *[pytest.param({"beta": 0.5, **c}, id=f"{c['loss_type']}") for c in SINGLE],
    pytest.param({"loss_type": "sigmoid", "beta": 0.1}, id="sigmoid-beta0.1"),
    pytest.param({"loss_type": "ipo", "beta": 0.1}, id="ipo-beta0.1"),
    pytest.param({"loss_type": "sppo_hard", "beta": 0.1}, id="sppo_hard-beta0.1"),
    # label smoothing where TRL has it
    pytest.param({"loss_type": "robust", "label_smoothing": 0.1, "beta": 0.5}, id="robust-eps0.1"),
    pytest.param({"loss_type": "exo_pair", "label_smoothing": 0.2, "beta": 0.5}, id="exo_pair-eps0.2"),
    pytest.param({"loss_type": "aot", "label_smoothing": 0.1, "beta": 0.5}, id="aot-eps0.1"),
    pytest.param(
        {"loss_type": "aot_unpaired", "label_smoothing": 0.1, "beta": 0.5}, id="aot_unpaired-eps0.1"
    ),
    # TRL's name and lit_pref's earlier one for the same loss
    pytest.param({"loss_type": "aot_pair", "beta": 0.5}, id="aot_pair-alias"),
    # lists with weights: each loss on the log-probs it is defined on
    pytest.param(
        {"loss_type": ["sigmoid", "ipo"], "loss_weights": [0.7, 0.3], "beta": 0.5}, id="sigmoid+ipo"
    ),
    pytest.param(
        {
            "loss_type": ["sigmoid_norm", "hinge", "nca_pair", "apo_down"],
            "loss_weights": [1.0, 0.5, 0.25, 2.0],
        },
        id="four-losses",
    ),
    pytest.param(
        {"loss_type": ["sigmoid", "sppo_hard"], "loss_weights": [0.8, 0.2], "beta": 0.5}, id="sigmoid+sppo"
    ),
    pytest.param(
        {"loss_type": ["aot", "aot_unpaired", "robust"], "label_smoothing": 0.1, "beta": 0.5},
        id="aot+robust-eps",
    ),
    # f-divergences (α-divergence: float32 below, TRL's branch has no float64 path)
    *[
        pytest.param({"loss_type": lt, "f_divergence_type": kind, "beta": 0.5, **extra}, id=f"{kind}-{lt}")
        for kind in ("forward_kl", "js_divergence")
        for lt, extra in [
            ("sigmoid", {}),
            ("hinge", {}),
            ("ipo", {}),
            ("sigmoid_norm", {}),
            ("discopop", {}),
            ("robust", {"label_smoothing": 0.1}),
            ("exo_pair", {"label_smoothing": 0.2}),
        ]
    ],
    pytest.param(
        {"loss_type": ["sigmoid", "ipo"], "f_divergence_type": "forward_kl", "beta": 0.5},
        id="forward_kl-sigmoid+ipo",
    ),
    # WPO
    pytest.param({"loss_type": "sigmoid", "use_weighting": True, "beta": 0.5}, id="wpo-sigmoid"),
    pytest.param(
        {"loss_type": ["sigmoid", "ipo"], "loss_weights": [0.5, 1.5], "use_weighting": True, "beta": 0.5},
        id="wpo-sigmoid+ipo",
    ),
    # LD-DPO (IPO divides the LD sums by the full completion length)
    pytest.param({"loss_type": "sigmoid", "ld_alpha": 0.5, "beta": 0.5}, id="ld-sigmoid"),
    pytest.param({"loss_type": "ipo", "ld_alpha": 0.5, "beta": 0.5}, id="ld-ipo"),
    pytest.param({"loss_type": "ipo", "ld_alpha": 0.0, "beta": 0.5}, id="ld0-ipo"),
    pytest.param({"loss_type": ["sigmoid", "ipo"], "ld_alpha": 0.5, "beta": 0.5}, id="ld-sigmoid+ipo"),
    pytest.param({"loss_type": "aot", "ld_alpha": 0.3, "beta": 0.5}, id="ld-aot"),
    pytest.param(
        {"loss_type": "ipo", "ld_alpha": 0.5, "f_divergence_type": "js_divergence", "beta": 0.5},
        id="ld-js-ipo",
    ),
    pytest.param(
        {"loss_type": "sigmoid", "ld_alpha": 0.5, "use_weighting": True, "beta": 0.5}, id="ld-wpo-sigmoid"
    ),
]


def trl_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same configuration in TRL's spelling (``aot_pair`` is lit_pref-only)."""
    loss_type = config.get("loss_type", "sigmoid")
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    return {**config, "loss_type": ["aot_unpaired" if n == "aot_pair" else n for n in names]}


@pytest.mark.parametrize("config", CASES)
def test_loss_gradient_and_rewards_equal_trl(config, dpo_module):
    pairs = make_pairs()
    lit_loss, lit_metrics = lit_dpo(dpo_module(**config), pairs)
    trl_loss, trl_metrics = trl_dpo(pairs, trl_config(config))
    close(lit_loss, trl_loss)
    close(grad(lit_loss, pairs), grad(trl_loss, pairs))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        close(lit_metrics[key].mean(), trl_metrics[key])
    if config.get("ld_alpha") is None:  # TRL logs the LD-weighted sums there, lit_pref the plain sums
        close(lit_metrics["logps/chosen"].mean(), trl_metrics["logps/chosen"])
        close(lit_metrics["logps/rejected"].mean(), trl_metrics["logps/rejected"])


def test_the_losses_really_differ():
    """Guards the parity tests against a degenerate fixture: on these log-probs the loss types give
    clearly different values (so equal numbers are not an accident of, say, all margins at 0)."""
    pairs = make_pairs()
    # robust at ε = 0 is sigmoid by definition, so it is compared at ε = 0.1.
    configs = [{**c, "label_smoothing": 0.1} if c["loss_type"] == "robust" else c for c in SINGLE]
    values = {
        c["loss_type"]: float(trl_dpo(pairs, trl_config({**c, "beta": 0.5}))[0].detach()) for c in configs
    }
    ordered = sorted(values.values())
    assert min(b - a for a, b in itertools.pairwise(ordered)) > 1e-3, values
    # The length-normalised margin is not the summed one here (lengths differ within each pair).
    assert abs(values["sigmoid"] - values["sigmoid_norm"]) > 1e-2


# --------------------------------------------------------------------- α-divergence (float32)

# TRL's α-divergence branch clamps its exponent with a table that has no float64 entry, so this
# comparison runs in float32, whose round-off is ~1e-7 relative: 1e-5 absolute and relative (IPO's
# loss reaches ~400 at α = 0.8 on these log-ratios, its gradients ~4).
ATOL_FLOAT32 = 1e-5


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["sigmoid", "ipo"]], ids=str)
@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.8])
def test_alpha_divergence_is_trl_at_one_minus_alpha(alpha, loss_type, dpo_module):
    """lit_pref's α is Wang et al. 2023's (f'(u) = (1 − u^−α)/α); TRL's coefficient is 1 − α of it.
    Equal at α = 0.5 (both defaults); for α ≠ 0.5 the same α differs and 1 − α matches."""
    pairs = make_pairs().as_dtype(torch.float32)
    config = {
        "loss_type": loss_type,
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": alpha,
    }
    lit_loss, _ = lit_dpo(dpo_module(**config, beta=0.5), pairs)
    trl_loss, _ = trl_dpo(pairs, {**config, "beta": 0.5, "f_alpha_divergence_coef": 1.0 - alpha})
    close(lit_loss, trl_loss, atol=ATOL_FLOAT32, rtol=ATOL_FLOAT32)
    close(grad(lit_loss, pairs), grad(trl_loss, pairs), atol=ATOL_FLOAT32, rtol=ATOL_FLOAT32)
    if alpha != 0.5:
        same_alpha, _ = trl_dpo(pairs, {**config, "beta": 0.5})
        assert abs(float(same_alpha.detach()) - float(lit_loss.detach())) > 100 * ATOL_FLOAT32


# --------------------------------------------------------------- documented differences


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_label_smoothing_on_sigmoid_is_cdpo(loss_type, dpo_module):
    """TRL 1.16's sigmoid ignores label_smoothing; lit_pref keeps cDPO (Mitchell 2023):
    loss(ε) = (1 − ε)·TRL(y_w ≻ y_l) + ε·TRL(y_l ≻ y_w)."""
    eps = 0.1
    pairs = make_pairs()
    lit_loss, _ = lit_dpo(dpo_module(loss_type=loss_type, label_smoothing=eps, beta=0.5), pairs)
    config = {"loss_type": [loss_type], "beta": 0.5}
    forward, _ = trl_dpo(pairs, config)
    backward, _ = trl_dpo(pairs.swapped(), config)
    close(lit_loss, (1 - eps) * forward + eps * backward)
    ignored, _ = trl_dpo(pairs, {**config, "label_smoothing": eps})
    close(ignored, forward)  # TRL's ε really is a no-op here
    assert abs(float(lit_loss) - float(forward)) > 1e-3


def test_exo_pair_without_smoothing_uses_the_paper_epsilon(dpo_module):
    """TRL requires ε > 0 for exo_pair; lit_pref's ε = 0 means EXO's recommended 1e-3."""
    pairs = make_pairs()
    lit_loss, _ = lit_dpo(dpo_module(loss_type="exo_pair", beta=0.5), pairs)
    trl_loss, _ = trl_dpo(pairs, {"loss_type": ["exo_pair"], "label_smoothing": 1e-3, "beta": 0.5})
    close(lit_loss, trl_loss)


def test_bco_pair_shifts_rewards_by_the_batch_mean(dpo_module):
    """lit_pref keeps BCO's reward shift δ (Jung et al. 2024), here the batch mean of all rewards;
    TRL 1.16 drops it. lit_pref's loss is TRL's with every reference log-prob raised by δ/β."""
    beta = 0.5
    pairs = make_pairs()
    lit_loss, metrics = lit_dpo(dpo_module(loss_type="bco_pair", beta=beta), pairs)
    delta = torch.cat([metrics["rewards/chosen"], metrics["rewards/rejected"]]).mean()
    ref_c = torch.stack([v.sum() for v in pairs.ref_chosen]) + delta / beta
    ref_r = torch.stack([v.sum() for v in pairs.ref_rejected]) + delta / beta
    shifted, _ = trl_dpo(pairs, {"loss_type": ["bco_pair"], "beta": beta}, ref_sums=(ref_c, ref_r))
    close(lit_loss, shifted)
    close(grad(lit_loss, pairs), grad(shifted, pairs))
    unshifted, _ = trl_dpo(pairs, {"loss_type": ["bco_pair"], "beta": beta})
    assert abs(float(delta)) > 1e-3 and abs(float(unshifted) - float(lit_loss)) > 1e-4


@pytest.mark.parametrize("weights", [None, [0.6, 1.5]], ids=["sft", "sigmoid+sft"])
def test_sft_term_is_a_per_example_mean(weights, dpo_module):
    """MPO's SFT term: lit_pref averages each chosen completion's token NLL, then the examples;
    TRL 1.16 averages over all chosen tokens of the batch. lit − TRL = w_sft·(mean_i NLL_i − token-mean NLL)."""
    pairs = make_pairs()
    loss_type = ["sft"] if weights is None else ["sigmoid", "sft"]
    w_sft = 1.0 if weights is None else weights[1]
    lit_loss, _ = lit_dpo(dpo_module(loss_type=loss_type, loss_weights=weights, beta=0.5), pairs)
    trl_loss, _ = trl_dpo(pairs, {"loss_type": loss_type, "loss_weights": weights, "beta": 0.5})
    per_example = torch.stack([-v.mean() for v in pairs.policy_chosen]).mean()
    per_token = -torch.cat(pairs.policy_chosen).mean()
    close(lit_loss - trl_loss, w_sft * (per_example - per_token))
    assert abs(float(per_example - per_token)) > 1e-2  # the chosen lengths (4, 1, 7, 3, 2) differ


def test_mpo_recipe_relation(dpo_module):
    """The MPO mix [sigmoid, bco_pair, sft] with weights [0.8, 0.2, 1.0] differs from TRL's by
    exactly the two documented terms: BCO's δ and the SFT term's averaging."""
    beta, weights = 0.5, [0.8, 0.2, 1.0]
    pairs = make_pairs()
    config = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": weights, "beta": beta}
    lit_loss, _ = lit_dpo(dpo_module(**config), pairs)
    trl_loss, _ = trl_dpo(pairs, config)
    trl_bco, _ = trl_dpo(pairs, {"loss_type": ["bco_pair"], "beta": beta})
    lit_bco, _ = lit_dpo(dpo_module(loss_type="bco_pair", beta=beta), pairs)
    per_example = torch.stack([-v.mean() for v in pairs.policy_chosen]).mean()
    per_token = -torch.cat(pairs.policy_chosen).mean()
    close(lit_loss - trl_loss, weights[1] * (lit_bco - trl_bco) + weights[2] * (per_example - per_token))


# ------------------------------------------------------------ both libraries' real log-prob paths


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(
            {"loss_type": ["sigmoid", "ipo"], "loss_weights": [0.7, 0.3], "ld_alpha": 0.5},
            id="sigmoid+ipo-ld",
        ),
        pytest.param({"loss_type": "sigmoid", "use_weighting": True}, id="wpo"),
    ],
)
def test_tiny_model_end_to_end(config, tiny_lm_dir):
    """Both libraries score the same token ids with the same tiny model (policy perturbed away from
    the reference) through their own log-prob paths, collators and loss code. Both compute the
    log-softmax in float32 whatever the weights' dtype, so the tolerance is float32's (1e-5 on a
    loss of order 1; the IPO-in-a-list bug this guards against moved it by ~1e-1)."""
    pairs = make_pairs(seed=3)
    module = DPO(model_name_or_path=str(tiny_lm_dir), beta=0.5, **config)
    module.configure_model()
    assert module.policy is not None and module.reference.network is not None
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    rows = [
        {"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r}
        for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected, strict=True)
    ]
    lit_loss, lit_metrics = module.shared_step(Collator(pad_token_id=0)(rows), "train")

    policy, reference = copy.deepcopy(module.policy), copy.deepcopy(module.reference.network).eval()
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    add_fused_lm_head(reference)
    examples = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected, strict=True)
    ]
    trainer = object.__new__(DPOTrainer)
    loss_type = config["loss_type"]
    trainer.__dict__.update(
        model=policy, ref_model=reference, accelerator=accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05), beta=0.5,
        loss_types=[loss_type] if isinstance(loss_type, str) else loss_type,
        loss_weights=config.get("loss_weights") or [1.0], label_smoothing=0.0, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5, use_weighting=config.get("use_weighting", False), ld_alpha=config.get("ld_alpha"),
        precompute_ref_logps=False, **train_step_state(),
    )  # fmt: skip
    trl_loss, trl_metrics = compute_loss(trainer, policy, DataCollatorForPreference(pad_token_id=0)(examples))
    close(lit_loss, trl_loss, atol=1e-5)
    close(lit_metrics["rewards/margins"].mean(), trl_metrics["rewards/margins"], atol=1e-5)
    assert math.isfinite(float(lit_loss)) and abs(float(lit_metrics["rewards/margins"].mean())) > 1e-3
