"""The ``make demo`` job end to end at reduced size."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from lit_pref.demo import run_demo


def test_demo_sft_then_dpo_improves_and_exports(tmp_path):
    results = run_demo(tmp_path, sft_steps=60, dpo_steps=150, n_eval=64)
    # DPO directly raises the chosen-over-rejected likelihood on this task's distribution; the
    # SFT model has no reason to prefer either, so a working DPO stage must clearly beat it.
    assert results["dpo"]["preference_accuracy"] >= results["sft"]["preference_accuracy"] + 0.1
    assert results["dpo"]["score"] > results["sft"]["score"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")
    assert model.config.num_hidden_layers == 2
