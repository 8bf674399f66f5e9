"""lit_pref's CPO / SimPO and ORPO modules against TRL 1.16's (``trl.experimental``) trainers.

TRL's CPO and ORPO trainers score sequences from full logits (``concatenated_forward``), so the
stand-in model here returns a seeded float64 logits tensor for TRL's concatenated batch (chosen
rows, then rejected rows, prompt + completion right-padded), and lit_pref's shared log-prob path
returns the log-softmax of the *same* logits at each completion token. Both trainers are built with
``object.__new__`` and the attributes ``get_batch_loss_metrics`` reads.

Documented differences, asserted as relations:

* the NLL term: lit_pref averages each chosen completion's token NLL, then the pairs; TRL averages
  over all chosen completion tokens of the batch (CPO), or over all chosen *prompt and completion*
  tokens (ORPO, whose paper's L_SFT is on the response only);
* ORPO's odds ratio is computed in float32 by TRL (``.float()``), so that term is compared at
  float32's tolerance.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from parity.trl_fakes import ATOL, DTYPE, accelerator, lit_logps
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from lit_pref.data.collate import Collator, pad
from lit_pref.modules.cpo import CPO
from lit_pref.modules.orpo import ORPO
from lit_pref.types import CompletionLogps

VOCAB = 24
PROMPT_LENGTHS = (3, 5, 2, 4)
CHOSEN_LENGTHS = (4, 1, 7, 3)
REJECTED_LENGTHS = (2, 6, 3, 5)
B = len(PROMPT_LENGTHS)


class LogitsTable(torch.nn.Module):
    """A causal LM whose logits for the one batch it knows are given."""

    def __init__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.input_ids, self.logits = input_ids, logits

    def forward(self, input_ids: torch.Tensor, **_: Any) -> types.SimpleNamespace:
        assert torch.equal(input_ids, self.input_ids)
        return types.SimpleNamespace(logits=self.logits)


def make_data(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    prompts = [ids(n) for n in PROMPT_LENGTHS]
    chosen = [ids(n) for n in CHOSEN_LENGTHS]
    rejected = [ids(n) for n in REJECTED_LENGTHS]
    sequences = [p + c for p, c in zip(prompts, chosen, strict=True)] + [
        p + r for p, r in zip(prompts, rejected, strict=True)
    ]
    width = max(len(s) for s in sequences)
    # Peaked logits keep the per-token probabilities well above 0 and the mean log-probs of order −1.
    logits = (2.0 * torch.randn(2 * B, width, VOCAB, generator=g, dtype=DTYPE)).requires_grad_()
    return {
        "prompts": prompts,
        "chosen": chosen,
        "rejected": rejected,
        "sequences": sequences,
        "logits": logits,
    }


def trl_batch(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """TRL's tokenized pair format: prompt + completion per side, labels −100 on the prompt."""
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        full = [p + c for p, c in zip(data["prompts"], data[side], strict=True)]
        labels = [[-100] * len(p) + c for p, c in zip(data["prompts"], data[side], strict=True)]
        batch[f"{side}_input_ids"] = pad(full, 0)
        batch[f"{side}_attention_mask"] = pad([[1] * len(s) for s in full], 0)
        batch[f"{side}_labels"] = pad(labels, -100)
    return batch


def completion_token_logps(data: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """log p(y_t | x, y_<t) of each completion token, read from the shared logits (row i: chosen i,
    row B + i: rejected i; the logits at position j predict token j + 1)."""
    logprobs = F.log_softmax(data["logits"], dim=-1)
    out: dict[str, list[torch.Tensor]] = {}
    for side, offset in (("chosen", 0), ("rejected", B)):
        rows = []
        for i, (p, c) in enumerate(zip(data["prompts"], data[side], strict=True)):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            rows.append(logprobs[offset + i, positions, torch.tensor(c)])
        out[side] = rows
    return out["chosen"], out["rejected"]


def run_lit(module: Any, data: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rows = [
        {"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r}
        for p, c, r in zip(data["prompts"], data["chosen"], data["rejected"], strict=True)
    ]
    batch = Collator(pad_token_id=0)(rows)
    chosen, rejected = completion_token_logps(data)
    table = lit_logps([row for pair in zip(chosen, rejected, strict=True) for row in pair])

    def logps(model: torch.nn.Module, batch_: dict[str, Any], **kwargs: Any) -> CompletionLogps:
        assert model is module.policy
        return table

    module.logps = logps
    return module.shared_step(batch, "train")


def per_example_and_token_nll(data: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, _ = completion_token_logps(data)
    return torch.stack([-c.mean() for c in chosen]).mean(), -torch.cat(chosen).mean()


# -------------------------------------------------------------------------------------- CPO


def trl_cpo(data: dict[str, Any], **config: Any) -> tuple[torch.Tensor, dict[str, float]]:
    batch = trl_batch(data)
    model = LogitsTable(_concat(batch), data["logits"])
    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(
        is_encoder_decoder=False, pad_token_id=0, accelerator=accelerator(), aux_loss_enabled=False,
        alpha=config.get("alpha", 0.0),
        loss_type=config["loss_type"], beta=config["beta"], label_smoothing=config.get("label_smoothing", 0.0),
        simpo_gamma=config.get("simpo_gamma", 0.5), cpo_alpha=config["cpo_alpha"],
    )  # fmt: skip
    return trainer.get_batch_loss_metrics(model, batch)


def _concat(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The input ids TRL's concatenated_forward feeds the model (both sides padded to one width)."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    sides = [batch[f"{s}_input_ids"] for s in ("chosen", "rejected")]
    return torch.cat([F.pad(ids, (0, width - ids.shape[1])) for ids in sides])


CPO_CASES = [
    pytest.param({"loss_type": "sigmoid", "beta": 0.1}, id="sigmoid"),
    pytest.param({"loss_type": "sigmoid", "beta": 0.5, "label_smoothing": 0.1}, id="sigmoid-eps"),
    pytest.param({"loss_type": "hinge", "beta": 0.5}, id="hinge"),
    pytest.param({"loss_type": "ipo", "beta": 0.5}, id="ipo"),
    pytest.param({"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0}, id="simpo"),
    pytest.param(
        {"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 0.5, "label_smoothing": 0.2}, id="simpo-eps"
    ),
]


@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.2])
@pytest.mark.parametrize("config", CPO_CASES)
def test_cpo_preference_term_equals_trl(config, alpha, tiny_lm_dir):
    """With cpo_alpha = 0 (no NLL term, pure SimPO) the losses, gradients and rewards are TRL's;
    also with AlphaPO's ``alpha`` (Gupta et al. 2025: every loss type's reward reshaped to
    (1 − p^(−α))/α)."""
    data = make_data()
    module = CPO(model_name_or_path=str(tiny_lm_dir), cpo_alpha=0.0, alpha=alpha, **config)
    module.configure_model()
    lit_loss, metrics = run_lit(module, data)
    trl_loss, trl_metrics = trl_cpo(data, cpo_alpha=0.0, alpha=alpha, **config)
    torch.testing.assert_close(lit_loss, trl_loss, atol=ATOL, rtol=0)
    (lit_grad,) = torch.autograd.grad(lit_loss, data["logits"])
    (trl_grad,) = torch.autograd.grad(trl_loss, data["logits"])
    torch.testing.assert_close(lit_grad, trl_grad, atol=ATOL, rtol=0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(float(metrics[key].mean()), trl_metrics[key], atol=ATOL, rtol=0)
    if alpha:
        plain_loss, _ = trl_cpo(data, cpo_alpha=0.0, **config)
        assert abs(float(plain_loss - trl_loss)) > 1e-3  # α changes the loss: the match is not vacuous


def test_alphapo_loss_type_is_trls_shorthand(tiny_lm_dir, tmp_path):
    """``loss_type: alphapo`` is what TRL's CPOConfig makes of it: simpo with cpo_alpha = 0."""
    args = CPOConfig(output_dir=str(tmp_path), loss_type="alphapo", alpha=0.2, report_to=[], use_cpu=True)
    module = CPO(model_name_or_path=str(tiny_lm_dir), loss_type="alphapo", alpha=0.2)
    config = module.loss_config
    assert (config.loss_type, config.cpo_alpha, config.alpha) == (args.loss_type, args.cpo_alpha, args.alpha)
    assert module.length_normalize  # TRL averages log-probs for simpo
    with pytest.raises(ValueError, match="alphapo has no NLL term"):
        CPO(model_name_or_path=str(tiny_lm_dir), loss_type="alphapo", cpo_alpha=1.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_cpo_nll_term_is_a_per_example_mean(loss_type, tiny_lm_dir):
    """CPO's L_NLL (Xu et al. 2024, §3): lit_pref averages each chosen completion's token NLL, then
    the pairs; TRL averages over all chosen tokens. lit − TRL = α·(mean_i NLL_i − token-mean NLL)."""
    alpha = 1.0
    data = make_data()
    config = {"loss_type": loss_type, "beta": 0.5, "simpo_gamma": 1.0}
    module = CPO(model_name_or_path=str(tiny_lm_dir), cpo_alpha=alpha, **config)
    module.configure_model()
    lit_loss, _ = run_lit(module, data)
    trl_loss, _ = trl_cpo(data, cpo_alpha=alpha, **config)
    per_example, per_token = per_example_and_token_nll(data)
    torch.testing.assert_close(lit_loss - trl_loss, alpha * (per_example - per_token), atol=ATOL, rtol=0)
    assert abs(float(per_example - per_token)) > 1e-2  # chosen lengths (4, 1, 7, 3) differ


# ------------------------------------------------------------------------------------- ORPO

# TRL computes the odds ratio in float32 (its odds_ratio_loss casts with .float()).
ATOL_FLOAT32 = 1e-5


def trl_orpo(data: dict[str, Any], beta: float) -> tuple[torch.Tensor, dict[str, float], ORPOTrainer]:
    batch = trl_batch(data)
    model = LogitsTable(_concat(batch), data["logits"])
    trainer = object.__new__(ORPOTrainer)
    trainer.__dict__.update(
        is_encoder_decoder=False,
        padding_value=0,
        accelerator=accelerator(),
        aux_loss_enabled=False,
        beta=beta,
    )
    loss, metrics = trainer.get_batch_loss_metrics(model, batch)
    return loss, metrics, trainer


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_odds_ratio_equals_trl_and_nll_relation(beta, tiny_lm_dir):
    """Hong et al. 2024, eqs. 6-7. The odds-ratio term, its log-odds-ratio diagnostic and the rewards
    equal TRL's; the SFT term differs as documented: lit_pref's is the mean of each chosen
    completion's token NLL, TRL's the token mean over chosen prompts *and* completions."""
    data = make_data()
    module = ORPO(model_name_or_path=str(tiny_lm_dir), beta=beta)
    module.configure_model()
    lit_loss, metrics = run_lit(module, data)
    trl_loss, trl_metrics, _ = trl_orpo(data, beta)

    # TRL's "log_odds_chosen" is the mean log odds ratio and its "log_odds_ratio" the mean log σ of it.
    torch.testing.assert_close(
        float(metrics["log_odds_ratio"].mean()), trl_metrics["log_odds_chosen"], atol=ATOL_FLOAT32, rtol=0
    )
    torch.testing.assert_close(
        float(-metrics["or_loss"].mean()), trl_metrics["log_odds_ratio"], atol=ATOL_FLOAT32, rtol=0
    )
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        torch.testing.assert_close(float(metrics[key].mean()), trl_metrics[key], atol=ATOL_FLOAT32, rtol=0)

    per_example, _ = per_example_and_token_nll(data)
    torch.testing.assert_close(float(metrics["nll"].mean()), float(per_example), atol=ATOL, rtol=0)
    # TRL's NLL: every predicted token of the chosen rows (prompt and completion), one mean.
    logprobs = F.log_softmax(data["logits"][:B], dim=-1)
    full = [torch.tensor(s) for s in data["sequences"][:B]]
    nll_all = torch.cat([-logprobs[i, torch.arange(len(s) - 1), s[1:]] for i, s in enumerate(full)])
    torch.testing.assert_close(trl_metrics["nll_loss"], float(nll_all.mean()), atol=ATOL, rtol=0)
    or_term = beta * metrics["or_loss"].mean()
    torch.testing.assert_close(lit_loss, per_example + or_term, atol=ATOL, rtol=0)
    torch.testing.assert_close(float(trl_loss), float(nll_all.mean() + or_term), atol=ATOL_FLOAT32, rtol=0)
    assert abs(float(nll_all.mean() - per_example)) > 1e-2
