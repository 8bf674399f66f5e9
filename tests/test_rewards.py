"""Reward sources: import paths, weights, None handling, the missing-EOS penalty, reward models."""

from __future__ import annotations

import math

import pytest
import torch

from lit_pref import tasks
from lit_pref.rewards import RewardSet, RewardSource, import_object, same_tokenizer
from lit_pref.rollout import Rollout, score_rollout
from lit_pref.scoring import RewardScorer


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def only_sad(prompts, completions, mood, **_):
    return [1.0 if m == "sad" else None for m in mood]


def seen_columns(prompts, completions, **columns):
    seen_columns.last = columns
    return [0.0] * len(completions)


def test_import_object():
    assert import_object("lit_pref.tasks:mood_reward") is tasks.mood_reward
    with pytest.raises(ValueError, match=r"pkg\.module:name"):
        import_object("lit_pref.tasks.mood_reward")
    with pytest.raises(ValueError, match="cannot import"):
        import_object("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="no attribute"):
        import_object("lit_pref.tasks:no_such_fn")


def test_reward_set_validation(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        RewardSet([])
    with pytest.raises(ValueError, match="one weight per reward"):
        RewardSet(["lit_pref.tasks:mood_reward"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="neither a reward-model directory"):
        RewardSet([str(tmp_path)])
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        RewardSet("lit_pref.tasks:mood_reward", missing_eos_penalty=-1.0)


def test_weighted_functions_none_and_penalty():
    prompts = ["Write a happy line about sea:", "Write a sad line about sea:"]
    completions = [" good joy", " bad dark"]
    rewards = RewardSet(
        ["lit_pref.tasks:mood_reward", length_reward, only_sad],
        weights=[2.0, 0.5, 3.0],
        missing_eos_penalty=1.5,
    )
    total, per_source = rewards.score(
        prompts, completions, {"mood": ["happy", "sad"]}, ended=torch.tensor([True, False])
    )
    mood = tasks.mood_reward(prompts, completions)
    assert list(per_source) == ["mood_reward", "length_reward", "only_sad"]
    assert math.isnan(per_source["only_sad"][0]) and per_source["only_sad"][1] == 1.0
    # None means "not scored by this source": it is left out of the sum, not counted as 0 or NaN.
    expected = torch.tensor(
        [2 * mood[0] + 0.5 * len(completions[0]), 2 * mood[1] + 0.5 * len(completions[1]) + 3.0 - 1.5]
    )
    torch.testing.assert_close(total, expected)


def test_functions_receive_columns_and_ids():
    rewards = RewardSet(seen_columns)
    rewards.score(["p", "p"], ["a", "b"], {"mood": ["happy", "happy"]}, completion_ids=[[1], [2, 3]])
    assert seen_columns.last == {"mood": ["happy", "happy"], "completion_ids": [[1], [2, 3]]}


def test_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        RewardSet(lambda prompts, completions, **_: [0.0]).score(["p", "q"], ["a", "b"])


def test_all_none_warns():
    with pytest.warns(UserWarning, match="scored by no reward source"):
        total, _ = RewardSet(lambda prompts, completions, **_: [None, 1.0]).score(["p", "q"], ["a", "b"])
    assert total.tolist() == [0.0, 1.0]


def test_completions_no_source_scored_are_counted_over_calls():
    rewards = RewardSet(lambda prompts, completions, **_: [None] * len(completions))
    with pytest.warns(UserWarning) as caught:
        rewards.score(["p", "q"], ["a", "b"])
        rewards.score(["p", "q", "r"], ["a", "b", "c"])
    assert [str(w.message) for w in caught] == [
        "2 of 2 completions were scored by no reward source (every source returned None for them); "
        "their reward is 0 (2 so far)",
        "3 of 3 completions were scored by no reward source (every source returned None for them); "
        "their reward is 0 (5 so far)",
    ]
    assert rewards.unscored == 5


def returns(*values):
    def reward(prompts, completions, **_):
        return list(values)

    return reward


@pytest.mark.parametrize(
    ("value", "shown"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (torch.tensor(math.nan), "nan")]
)
def test_nan_and_inf_rewards_are_errors_naming_the_function_and_completion(value, shown):
    rewards = RewardSet(returns(1.0, value), weights=[2.0])
    rewards.sources[0].name = "my_reward"
    with pytest.raises(ValueError) as info:
        rewards.score(["Write a happy line:", "Write a sad line:"], [" good", " dark"])
    assert str(info.value) == (
        f"reward function my_reward returned {shown} for completion 1 (prompt 'Write a sad line:', completion "
        "' dark'); a reward must be a finite number, or None where it does not apply"
    )


def test_a_reward_that_is_not_a_number_is_an_error():
    rewards = RewardSet(returns("high", 1.0))
    rewards.sources[0].name = "my_reward"
    with pytest.raises(ValueError) as info:
        rewards.score(["p", "q"], ["a", "b"])
    assert str(info.value) == (
        "reward function my_reward returned 'high' (str) for completion 0 (prompt 'p', completion 'a'); "
        "expected a number, or None where it does not apply"
    )


def test_numbers_of_any_numeric_type_are_rewards():
    with pytest.warns(UserWarning, match="1 of 4 completions were scored by no reward source"):
        total, _ = RewardSet(returns(1, True, torch.tensor(0.5), None)).score(list("pqrs"), list("abcd"))
    assert total.tolist() == [1.0, 1.0, 0.5, 0.0]


def test_a_reward_model_giving_nan_is_an_error():
    class NanScorer:
        def score(self, prompts, completions):
            return [0.5, math.nan]

    rewards = RewardSet(returns(0.0, 0.0))
    rewards.sources.append(RewardSource("rm", 1.0, directory="outputs/reward/model", scorer=NanScorer()))
    with pytest.raises(ValueError) as info:
        rewards.score(["p", "q"], ["a", "b"])
    assert str(info.value) == (
        "reward model outputs/reward/model gave nan for 1 of 2 completions, e.g. completion 1 (prompt 'q', "
        "completion 'b'); its scores must be finite (a float16 overflow? load it in float32 or bfloat16)"
    )


def test_reward_model_scores_sampled_ids_like_text(tiny_rm_dir, tokenizer):
    """A reward model sharing the policy's tokenizer reads the sampled ids; they give the same
    rewards as scoring the text with the reward model's own tokenizer."""
    rewards = RewardSet([str(tiny_rm_dir), "lit_pref.tasks:mood_reward"], weights=[1.0, 0.0])
    rewards.load_models(tokenizer)
    source = rewards.sources[0]
    assert isinstance(source.scorer, RewardScorer) and source.score_ids
    assert same_tokenizer(tokenizer, source.scorer.tokenizer)

    prompts = ["Write a happy line about sea:", "Write a sad line about the river today:"]
    completions = [" good warm joy", " dark"]
    encoded = [tokenizer(p).input_ids for p in prompts]
    width = max(len(e) for e in encoded)
    completion_ids = [
        [*tokenizer(c, add_special_tokens=False).input_ids, tokenizer.eos_token_id] for c in completions
    ]
    cwidth = max(len(c) for c in completion_ids)
    rollout = Rollout(
        prompt_input_ids=torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded]),
        prompt_attention_mask=torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded]),
        completion_input_ids=torch.tensor(
            [c + [tokenizer.pad_token_id] * (cwidth - len(c)) for c in completion_ids]
        ),
        completion_attention_mask=torch.tensor(
            [[1] * len(c) + [0] * (cwidth - len(c)) for c in completion_ids]
        ),
        ended=torch.tensor([True, True]),
        num_generations=1,
        prompts=prompts,
        completions=completions,
    )
    total, per_source = score_rollout(rewards, rollout, tokenizer.pad_token_id)
    from_text = torch.tensor(source.scorer.score(prompts, completions))
    torch.testing.assert_close(per_source[source.name], from_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(total, from_text, atol=1e-5, rtol=0)

    # A tokenizer with another vocabulary makes the reward model read text instead.
    from lit_pref.tiny import build_tiny_tokenizer

    other = RewardSet(str(tiny_rm_dir))
    other.load_models(build_tiny_tokenizer(["completely different text corpus"], vocab_size=300))
    assert not other.sources[0].score_ids
    total_text, _ = score_rollout(other, rollout, tokenizer.pad_token_id)
    torch.testing.assert_close(total_text, from_text, atol=1e-5, rtol=0)
