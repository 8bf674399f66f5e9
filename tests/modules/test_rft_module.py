"""Rejection-sampling fine-tuning (RFT) and IterativeSFT: selection, loss, empty rounds, the
user-driven API, the shipped config, learning."""

from __future__ import annotations

import csv
import math
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_helpers import run_config
from rl_helpers import StepsPerBatch, held_out_prompts, make_trainer, mean_reward, prompts_data, sampled_kl

from lit_pref import tasks
from lit_pref.data.tokenize import encode_completion, encode_prompt
from lit_pref.losses.rft import rft_loss, select_completions
from lit_pref.modules import SFT
from lit_pref.modules.rft import RFT, IterativeSFT, RFTTensors

MOOD = "lit_pref.tasks:mood_reward"


def happy_only_reward(prompts, completions, **_):
    """1 for every completion of a ``happy`` prompt, 0 for ``sad`` ones."""
    return [float(tasks.parse_mood(p) == "happy") for p in prompts]


def prompt_batch(module):
    data = prompts_data(batch_size=4)
    data._tokenizer = module.tokenizer
    data.target = "prompt_only"
    data.setup()
    return next(iter(data.train_dataloader()))


def weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


# ---------------------------------------------------------------- selection
def test_select_completions_closed_form():
    # Three prompts, k = 3: a clear best, a tie for the best (the first sampled wins), all low.
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.7, -0.5, -0.2, -0.9])
    top1 = select_completions(scores, 3, "top1")
    assert top1.tolist() == [False, True, False, True, False, False, False, True, False]
    # top1 with a bar: the third prompt's best (−0.2) does not reach 0, so it keeps nothing.
    barred = select_completions(scores, 3, "top1", reward_threshold=0.0)
    assert barred.tolist() == [False, True, False, True, False, False, False, False, False]
    # threshold: every sample >= 0.5, however many per prompt (equality counts).
    above = select_completions(scores, 3, "threshold", reward_threshold=0.5)
    assert above.tolist() == [False, True, True, True, False, True, False, False, False]
    assert not select_completions(scores, 3, "threshold", reward_threshold=1.0).any()
    with pytest.raises(ValueError, match="needs a reward_threshold"):
        select_completions(scores, 3, "threshold")
    with pytest.raises(ValueError, match="keep must be one of"):
        select_completions(scores, 3, "best")  # type: ignore[arg-type]


def test_rft_loss_closed_form():
    token_logps = torch.tensor([[-1.0, -2.0, -7.0], [-3.0, -5.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = rft_loss(token_logps, mask)
    assert loss.item() == pytest.approx((1 + 2 + 3) / 3)
    loss.backward()
    # d/d log π = −1/T on counted tokens, 0 elsewhere (the unkept tokens get no gradient).
    torch.testing.assert_close(token_logps.grad, -mask.float() / 3)
    # A mean over a whole mini-batch: normalised by its token count, not this batch's.
    assert rft_loss(token_logps, mask, torch.tensor(6.0)).item() == pytest.approx(1.0)
    nothing = rft_loss(token_logps, torch.zeros_like(mask))
    assert nothing.item() == 0.0 and math.isfinite(nothing.item())


# ------------------------------------------------------------------- config
def test_configuration_is_validated(tiny_lm_dir):
    model = str(tiny_lm_dir)
    with pytest.raises(ValueError, match="needs rewards"):
        RFT(model_name_or_path=model)
    with pytest.raises(ValueError, match="num_generations must be >= 1"):
        RFT(model_name_or_path=model, rewards=MOOD, num_generations=0)
    with pytest.raises(ValueError, match="keep must be one of"):
        RFT(model_name_or_path=model, rewards=MOOD, keep="best")
    with pytest.raises(ValueError, match="keep: threshold keeps the completions"):
        RFT(model_name_or_path=model, rewards=MOOD, keep="threshold")
    with pytest.raises(ValueError, match="top1 of num_generations=1 keeps every sample"):
        RFT(model_name_or_path=model, rewards=MOOD, num_generations=1)
    with pytest.raises(ValueError, match="reward_threshold must be a finite number"):
        RFT(model_name_or_path=model, rewards=MOOD, reward_threshold=math.nan)
    with pytest.raises(ValueError, match="sft_epochs must be >= 1"):
        RFT(model_name_or_path=model, rewards=MOOD, sft_epochs=0)
    with pytest.raises(ValueError, match="reference-free loss uses reference='none'"):
        RFT(model_name_or_path=model, rewards=MOOD, reference="copy")
    with pytest.raises(ValueError, match="no reference model"):
        RFT(model_name_or_path=model, rewards=MOOD, ref_model_name_or_path=model)
    # Valid: one sample per prompt filtered by a bar; top1 with a bar.
    assert RFT(
        model_name_or_path=model, rewards=MOOD, num_generations=1, keep="threshold", reward_threshold=0.5
    )
    module = RFT(model_name_or_path=model, rewards=MOOD, reward_threshold=0.5, sft_epochs=3)
    assert module.num_epochs == 3 and module.num_generations == 8
    module.configure_model()
    assert module.reference.kind == "none" and module.reference.network is None


# ------------------------------------------------------------------- losses
def test_loss_trains_only_the_kept_completions(tiny_lm_dir):
    """Accumulated one-prompt micro-batches ≡ the token-mean NLL of the kept completions in one
    pass: the kept-rows batch, the zero-weight row of a micro-batch that kept nothing, and the
    mini-batch normaliser together give the exact loss and gradient."""
    module = RFT(model_name_or_path=str(tiny_lm_dir), rewards=MOOD, num_generations=3, max_new_tokens=5)
    module.configure_model()
    torch.manual_seed(0)
    rollout = module.sample(prompt_batch(module))
    keep = torch.tensor([True, False, True, False, False, False, False, True, False, True, True, True])
    tensors = RFTTensors(keep)
    params = [p for p in module.policy.parameters() if p.requires_grad]

    full = module.logps(module.policy, rollout.batch())
    counted = full.mask & keep[:, None]
    expected = -full.token_logps[counted].sum() / counted.sum()
    expected_grads = torch.autograd.grad(expected, params)

    num_items = counted.sum().float()
    total = torch.zeros(())
    for prompt in range(rollout.num_prompts):
        rows = torch.tensor([prompt])
        loss, metrics = module.rollout_loss(
            rollout.select(rows), tensors.select(rollout.completion_rows(rows)), num_items
        )
        loss.backward()
        total = total + loss.detach()
        assert metrics["loss"].numel() == int(counted[rollout.completion_rows(rows)].sum())
    torch.testing.assert_close(total, expected.detach(), rtol=1e-5, atol=1e-6)
    for param, grad in zip(params, expected_grads, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)

    # A mini-batch with nothing kept on any rank: a backward that reaches no weight.
    module.policy.zero_grad(set_to_none=True)
    loss, metrics = module.rollout_loss(rollout, RFTTensors(torch.zeros_like(keep)), torch.tensor(0.0))
    loss.backward()
    assert loss.item() == 0.0 and metrics == {}
    assert all(p.grad is None for p in params)


# ------------------------------------------------------------------- rounds
def test_round_steps_metrics_and_samples(tiny_lm_dir, tmp_path):
    """sft_epochs × num_mini_batches optimizer steps per round; per-round metrics; the kept column."""
    module = RFT(
        model_name_or_path=str(tiny_lm_dir),
        rewards=MOOD,
        num_generations=4,
        max_new_tokens=4,
        sft_epochs=2,
        num_mini_batches=2,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )
    counter = StepsPerBatch()
    trainer = make_trainer(tmp_path, limit_train_batches=2, max_epochs=1, callbacks=[counter])
    module.configure_model()
    before = weights(module)
    trainer.fit(module, prompts_data(batch_size=4))
    assert counter.steps == [4, 4] and trainer.global_step == 8
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["train/rft/keep_rate"] == pytest.approx(1 / 4)  # top1 of 4: one per prompt
    assert metrics["train/rft/prompt_keep_rate"] == 1.0
    assert metrics["train/rft/kept_score"] >= metrics["train/score"]
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    samples = module.latest_samples
    assert len(samples) == 16 and sum(row["kept"] for row in samples) == 4
    for group in range(4):
        rows = samples[group * 4 : group * 4 + 4]
        best = max(range(4), key=lambda j: (rows[j]["score"], -j))
        assert [row["kept"] for row in rows] == [j == best for j in range(4)]


def test_round_with_nothing_kept(tiny_lm_dir, tmp_path):
    """A bar no sample reaches: no weight changes, no optimizer state, a counted warning, no NaN."""
    module = RFT(
        model_name_or_path=str(tiny_lm_dir),
        rewards=MOOD,
        num_generations=2,
        max_new_tokens=4,
        keep="threshold",
        reward_threshold=2.0,  # the task's reward is at most 1
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
    )
    module.configure_model()
    before = weights(module)
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.warns(UserWarning, match=r"RFT kept none of the 8 samples") as caught:
        trainer.fit(module, prompts_data(batch_size=4))
    counts = [str(w.message) for w in caught if "kept none" in str(w.message)]
    assert "1 such round(s)" in counts[0] and "2 such round(s)" in counts[-1]
    assert trainer.global_step == 2 and module.empty_rounds == 2
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    assert not trainer.optimizers[0].state  # AdamW never saw a gradient (no momentum, no decay)
    metrics = trainer.callback_metrics
    assert (
        float(metrics["train/rft/keep_rate"]) == 0.0 and float(metrics["train/rft/prompt_keep_rate"]) == 0.0
    )
    assert "train/loss" not in metrics and "train/rft/kept_score" not in metrics
    assert math.isfinite(float(metrics["train/score"]))


def test_micro_batches_that_keep_nothing(tiny_lm_dir, tmp_path):
    """Only happy prompts keep samples; one prompt per micro-batch, so the sad ones run the
    zero-weight path inside a mini-batch that does learn."""
    module = RFT(
        model_name_or_path=str(tiny_lm_dir),
        rewards=happy_only_reward,
        num_generations=2,
        max_new_tokens=4,
        keep="threshold",
        reward_threshold=0.5,
        gradient_accumulation_steps=8,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )
    module.configure_model()
    before = weights(module)
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, prompts_data(batch_size=8))
    assert trainer.global_step == 3
    keep_rate = float(trainer.callback_metrics["train/rft/keep_rate"])
    assert 0 < keep_rate < 1 and module.empty_rounds == 0
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())


# ------------------------------------------------------------ iterative API
def test_iterative_sft_closed_form_and_step_count(tiny_lm_dir):
    """train_on: the loss is the completion-token NLL (a plain full-sequence forward, counted on the
    completion tokens only), one step per batch per epoch, and it lowers the loss it trains on."""
    rows = tasks.sft_rows(7, seed=3)
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    module = SFT(model_name_or_path=str(tiny_lm_dir), optimizer=partial(torch.optim.AdamW, lr=1e-2))
    sft = IterativeSFT(module, batch_size=len(rows))
    tokenizer = module.tokenizer

    nll, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            prompt_ids = encode_prompt(tokenizer, prompt)
            completion_ids = encode_completion(tokenizer, prompt, completion, prompt_ids, 0)
            assert completion_ids[-1] == tokenizer.eos_token_id
            ids = torch.tensor([prompt_ids + completion_ids])
            logps = module.policy(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            nll -= float(logps[len(prompt_ids) - 1 :].sum())
            tokens += len(completion_ids)
    before = weights(module)
    first = sft.train_on(prompts, completions)
    assert first.steps == 1 and first.tokens == tokens
    assert first.loss == pytest.approx(nll / tokens, rel=1e-5)
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    again = sft.train_on(prompts, completions)
    assert again.loss < first.loss

    # epochs × ceil(n / batch_size) steps; conversational prompts take the chat template.
    several = IterativeSFT(module, batch_size=3, epochs=2).train_on(prompts, completions)
    assert several.steps == 2 * 3 and several.tokens == 2 * tokens
    chat = tasks.sft_rows(2, seed=4, conversational=True)
    assert sft.train_on([r["prompt"] for r in chat], [r["completion"] for r in chat]).steps == 1


def test_iterative_sft_empty_call_and_errors(tiny_lm_dir):
    module = SFT(model_name_or_path=str(tiny_lm_dir))
    sft = IterativeSFT(module)
    before = weights(module)
    with pytest.warns(UserWarning, match="no \\(prompt, completion\\) pair to train on"):
        update = sft.train_on([], [])
    assert update.steps == 0 and update.loss is None
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        sft.train_on(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        IterativeSFT(module, batch_size=0)
    plateau = SFT(
        model_name_or_path=str(tiny_lm_dir), lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau)
    )
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        IterativeSFT(plateau)


def test_iterative_sft_from_a_plain_loop_learns(sft_dir):
    """The use TRL's IterativeSFTTrainer served: user code samples with ``generate``, picks what
    to keep by its own rule, and calls train_on between rounds; no Trainer anywhere."""
    L.seed_everything(0)
    module = SFT(model_name_or_path=str(sft_dir), optimizer=partial(torch.optim.AdamW, lr=2e-3))
    sft = IterativeSFT(module, batch_size=8)
    tokenizer = module.tokenizer
    before = mean_reward(module.policy, tokenizer)
    train_prompts = [row["prompt"] for row in tasks.mood_prompts()["train"]]
    for round_ in range(8):
        prompts, completions = [], []
        for prompt in train_prompts[round_ * 8 : round_ * 8 + 8]:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            with torch.no_grad():
                out = module.policy.generate(
                    ids,
                    do_sample=True,
                    max_new_tokens=10,
                    num_return_sequences=4,
                    pad_token_id=tokenizer.pad_token_id,
                )
            samples = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            prompts.append(prompt)
            completions.append(max(samples, key=lambda c, p=prompt: tasks.score(p, c)))
        assert sft.train_on(prompts, completions).steps == 1
    after = mean_reward(module.policy, tokenizer)
    print(f"IterativeSFT (user loop, best of 4, 8 rounds) mean reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.15, (before, after)


# ------------------------------------------------------------------- config
def test_shipped_config_runs_through_the_cli(in_project):
    cli, rows = run_config(
        "fit",
        "rft.yaml",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=1",
        "--trainer.limit_val_batches=1",
        "--data.max_val_samples=4",
    )
    assert isinstance(cli.model, RFT) and cli.trainer.global_step == 2
    logged = {key for row in rows for key in row}
    for name in ("train/score", "train/rft/keep_rate", "train/rft/kept_score", "train/loss", "val/score"):
        assert name in logged, name
    assert all(
        row["train/rft/keep_rate"] == pytest.approx(1 / 8) for row in rows if "train/rft/keep_rate" in row
    )
    run = in_project / "outputs" / "rft"
    assert (run / "model" / "config.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    samples = list(csv.DictReader((Path(cli.trainer.logger.log_dir) / "samples.csv").open(encoding="utf-8")))
    assert len(samples) == 8 and {row["kept"] for row in samples} <= {"True", "False"}


# ----------------------------------------------------------------- learning
def kl_to_start(module, start) -> float:
    """:func:`sampled_kl` on 4 samples of the trained policy for each held-out prompt."""
    rollout = module.sample(held_out_prompts(module.tokenizer), num_generations=4)
    return sampled_kl(module.policy, start, rollout)


def test_rft_raises_the_task_reward(sft_dir, tmp_path):
    """RFT (best of 8, one SFT pass per round) from the briefly SFT-trained tiny model.

    A run that does not learn stays at the starting reward (± ~0.03 of sampling noise over 128
    completions); the margin asked for is several times that.
    """
    L.seed_everything(0)
    module = RFT(
        model_name_or_path=str(sft_dir),
        rewards=MOOD,
        num_generations=8,
        max_new_tokens=10,
        optimizer=partial(torch.optim.AdamW, lr=2e-3),
    )
    module.configure_model()
    start = module.load_network(str(sft_dir)).eval()
    before = mean_reward(module.policy, module.tokenizer)
    began = time.perf_counter()
    trainer = make_trainer(tmp_path, max_steps=12)
    trainer.fit(module, prompts_data(batch_size=8))
    seconds = time.perf_counter() - began
    after = mean_reward(module.policy, module.tokenizer)
    kl = kl_to_start(module, start)
    print(
        f"RFT mean reward {before:.3f} -> {after:.3f} in {trainer.global_step} steps, {seconds:.1f}s; "
        f"kl to start {kl:.3f}; keep rate {float(trainer.callback_metrics['train/rft/keep_rate']):.3f}"
    )
    assert after > before + 0.25, (before, after)
    assert math.isfinite(kl) and kl > 0
