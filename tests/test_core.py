"""The module core: networks built exactly once, the rollout-engine interface, injected schedulers."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from rl_helpers import make_trainer, prompts_data

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.engines import GenerateEngine, RolloutEngine, Samples
from lit_pref.modules import DPO, GRPO, PPO

MOOD = "lit_pref.tasks:mood_reward"


class RecordingEngine(RolloutEngine):
    """The built-in engine, recording every call the online base makes to the interface."""

    def __init__(self) -> None:
        self.inner = GenerateEngine()
        self.sampled: list[tuple[int, int]] = []  # (prompts, completions per prompt)
        self.weight_updates = 0

    def sample(self, policy, prompt_input_ids, prompt_attention_mask, num_generations, settings, tokenizer) -> Samples:
        self.sampled.append((prompt_input_ids.shape[0], num_generations))
        return self.inner.sample(policy, prompt_input_ids, prompt_attention_mask, num_generations, settings, tokenizer)

    def weights_changed(self, policy) -> None:
        self.weight_updates += 1


def test_build_networks_runs_once_then_sharding_every_call(tiny_lm_dir, monkeypatch):
    module = DPO(model_name_or_path=str(tiny_lm_dir))
    builds, shards = [], []
    original = DPO.build_networks
    monkeypatch.setattr(DPO, "build_networks", lambda self: (builds.append(1), original(self)))
    monkeypatch.setattr(DPO, "shard_networks", lambda self: shards.append(1))
    module.configure_model()
    policy, reference = module.policy, module.reference.network
    module.configure_model()  # Lightning calls it again for validate / test: nothing is rebuilt
    assert builds == [1] and shards == [1, 1]
    assert module.policy is policy and module.reference.network is reference is not None


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_modules_sample_through_the_engine_and_tell_it_of_each_step(algorithm, tiny_lm_dir, tmp_path):
    engine = RecordingEngine()
    common = dict(model_name_or_path=str(tiny_lm_dir), rewards=MOOD, max_new_tokens=4, rollout_engine=engine)
    if algorithm == "grpo":
        module = GRPO(num_generations=2, num_iterations=2, num_mini_batches=2, **common)
        steps_per_rollout, k = 4, 2
    else:
        module = PPO(num_ppo_epochs=3, **common)
        steps_per_rollout, k = 3, 1
    trainer = make_trainer(tmp_path, limit_train_batches=2, max_epochs=1)
    trainer.fit(module, prompts_data(batch_size=4))
    assert engine.sampled == [(4, k), (4, k)]  # one rollout per batch of prompts
    assert engine.weight_updates == trainer.global_step == 2 * steps_per_rollout


def test_reduce_lr_on_plateau_steps_in_the_online_loop(tiny_lm_dir, tmp_path):
    """An injected ReduceLROnPlateau steps on the loss under manual optimisation."""
    module = GRPO(
        model_name_or_path=str(tiny_lm_dir), rewards=MOOD, num_generations=2, max_new_tokens=4,
        optimizer=partial(torch.optim.SGD, lr=1e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5),
    )  # fmt: skip
    trainer = make_trainer(tmp_path, limit_train_batches=3, max_epochs=1)
    trainer.fit(module, prompts_data(batch_size=4))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler.last_epoch == trainer.global_step == 3  # stepped once per optimizer step


def test_reduce_lr_on_plateau_monitors_the_training_loss_offline(tiny_lm_dir, tmp_path):
    module = DPO(
        model_name_or_path=str(tiny_lm_dir),
        optimizer=partial(torch.optim.SGD, lr=1e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0),
    )
    data = PreferenceDataModule(
        "lit_pref.tasks:mood_preferences", tokenizer_name_or_path=str(tiny_lm_dir), batch_size=4,
        max_train_samples=8, val_split=None,
    )  # fmt: skip
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, data)
    config = trainer.lr_scheduler_configs[0]
    assert config.monitor == "train/loss" and config.scheduler.last_epoch == 2


KILLED_DURING_EXPORT = """
import os, signal, sys
from lit_pref.modules import DPO

module = DPO(model_name_or_path=sys.argv[1])
module.configure_model()
def die(directory, *args, **kwargs):  # the weights are written, the tokenizer is not: SIGKILL now
    os.kill(os.getpid(), signal.SIGKILL)
module.tokenizer.save_pretrained = die
module.save_pretrained(sys.argv[2])
"""


def test_export_is_atomic_when_killed_midway(tiny_lm_dir, tmp_path):
    """A process SIGKILLed in the middle of an export leaves the previous complete export in place."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    first = DPO(model_name_or_path=str(tiny_lm_dir))
    first.configure_model()
    first.save_pretrained(out)
    before = sorted(p.name for p in out.iterdir())
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_EXPORT, str(tiny_lm_dir), str(out)], timeout=300)
    assert killed.returncode == -9
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    partial = tmp_path / "model.partial"
    assert (partial / "config.json").is_file() and not (partial / "tokenizer_config.json").exists()
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    # The next export replaces both the old one and the leftover.
    first.save_pretrained(out)
    assert not partial.exists() and not (tmp_path / "model.previous").exists()
    assert sorted(p.name for p in out.iterdir()) == before


def test_reference_fingerprint_follows_the_weights_content(tiny_lm_dir, tmp_path):
    """Weights rewritten in place with size and mtime kept (cp -p, rsync -a) change the cache key."""
    import os
    import shutil

    from lit_pref.reference import model_fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    before = model_fingerprint(str(model))
    assert model_fingerprint(str(model)) == before  # deterministic
    weights = next(model.glob("*.safetensors"))
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert model_fingerprint(str(model)) != before


def test_corrupt_reference_cache_is_reported_and_rebuilt(tmp_path):
    from lit_pref.reference import RefLogpCache

    cache = RefLogpCache(tmp_path, "key")
    table = torch.arange(6.0).view(3, 2)
    cache.save(table, is_global_zero=True)
    assert torch.equal(cache.load(), table)
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]  # no temporary left behind
    cache.path.write_bytes(cache.path.read_bytes()[:40])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match=r"cache .* is unreadable \(.*\); rebuilding it") as caught:
        assert cache.load() is None
    assert len(caught) == 1 and "weights_only" not in str(caught[0].message)
    assert not cache.path.exists()
    cache.save(table, is_global_zero=True)
    assert torch.equal(cache.load(), table)


def test_grpo_takes_trls_bool_scale_rewards(tiny_lm_dir):
    make = partial(GRPO, model_name_or_path=str(tiny_lm_dir), rewards=MOOD)
    assert make(scale_rewards=True).loss_config.scale_rewards == "group"
    assert make(scale_rewards=False).loss_config.scale_rewards == "none"
    assert make(advantage_estimator="rloo", scale_rewards=False).loss_config.scale_rewards == "none"
    with pytest.raises(ValueError, match="RLOO advantages are not scaled"):
        make(advantage_estimator="rloo", scale_rewards=True)


def test_a_second_run_waits_for_the_cache_being_computed_and_reuses_it(tmp_path):
    """Two runs on one cache: the second holds the lock only after the first has written the
    table, so it loads it instead of computing it again."""
    import threading

    from lit_pref.reference import RefLogpCache

    first_cache, second_cache = RefLogpCache(tmp_path, "key"), RefLogpCache(tmp_path, "key")
    events: list[str] = []
    inside = threading.Event()

    def first_run() -> None:
        with first_cache.lock(is_global_zero=True):
            events.append("first computes")
            inside.set()
            threading.Event().wait(0.3)  # the work the second run must not repeat
            first_cache.save(torch.ones(3, 2), is_global_zero=True)
            events.append("first saved")

    thread = threading.Thread(target=first_run)
    thread.start()
    inside.wait()
    with second_cache.lock(is_global_zero=True):
        events.append("second looks")
        loaded = second_cache.load()
    thread.join()
    assert events == ["first computes", "first saved", "second looks"]
    assert loaded is not None and torch.equal(loaded, torch.ones(3, 2))


def test_a_missing_local_model_path_fails_at_once_in_the_python_api(tmp_path, monkeypatch):
    """Not retried as a hub id for a minute: one line naming the path (outputs/ exists here)."""
    from lit_pref.models import load_causal_lm

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer 'outputs/does-not-exist' does not exist \(.*outputs exists"):
        DPO(model_name_or_path="outputs/does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"model './nope' does not exist"):
        load_causal_lm("./nope")
