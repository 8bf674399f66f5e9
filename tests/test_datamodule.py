"""PreferenceDataModule: every source, every shape, truncation counts, caching, bad input."""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings

import datasets
import pytest
import torch
from data_helpers import isolated_offline_datasets, make  # noqa: F401 (an autouse fixture)
from datasets import Dataset, DatasetDict

from lit_pref import tasks
from lit_pref.data.datamodule import PreferenceDataModule, load_raw
from lit_pref.data.formats import DataFormatError
from lit_pref.models import load_tokenizer
from lit_pref.tiny import build_tiny_tokenizer

HH = "\n\nHuman: Write a {mood} line about {topic}.\n\nAssistant:"


@pytest.fixture
def logs(caplog, monkeypatch):
    """Lightning's rank-zero messages, which its logger does not propagate by default."""
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO)
    return caplog


def paired_rows(n=6, seed=0):
    rows = tasks.preference_rows(n, seed=seed)
    for i, row in enumerate(rows):
        row["margin"] = float(i) / 2
        row["source"] = f"s{i}"
    return rows


def expected_paired(tokenizer, rows):
    """What every loader must produce for ``rows``: the in-memory result."""
    return make(Dataset.from_list(rows), tokenizer).splits["train"]


# ------------------------------------------------------------------- sources
def write(rows, path, fmt):
    ds = Dataset.from_list(rows)
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    return str(path)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv"])
def test_loads_files(tokenizer, tmp_path, fmt):
    rows = paired_rows()
    dm = make(write(rows, tmp_path / f"data.{fmt}", fmt), tokenizer)
    train = dm.splits["train"]
    expected = expected_paired(tokenizer, rows)
    assert len(train) == len(rows)
    for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "margin", "source", "index"):
        assert train[key] == expected[key], key


def test_loads_a_split_mapping_save_to_disk_and_in_memory_data(tokenizer, tmp_path):
    train_rows, test_rows = paired_rows(6, seed=0), paired_rows(3, seed=1)
    mapping = {
        "train": write(train_rows, tmp_path / "train.json", "json"),
        "test": write(test_rows, tmp_path / "test.jsonl", "jsonl"),  # .json and .jsonl mix
    }
    whole = DatasetDict({"train": Dataset.from_list(train_rows), "test": Dataset.from_list(test_rows)})
    whole.save_to_disk(str(tmp_path / "dict_dir"))
    Dataset.from_list(train_rows).save_to_disk(str(tmp_path / "ds_dir"))
    expected = expected_paired(tokenizer, train_rows)
    for source in (mapping, str(tmp_path / "dict_dir"), whole):
        dm = make(source, tokenizer, val_split="test")
        assert dm.splits["train"]["chosen_input_ids"] == expected["chosen_input_ids"]
        assert len(dm.splits["val"]) == len(test_rows)
    for source in (str(tmp_path / "ds_dir"), Dataset.from_list(train_rows)):
        dm = make(source, tokenizer, val_split="test")
        assert set(dm.splits) == {"train"}
        assert dm.splits["train"]["chosen_input_ids"] == expected["chosen_input_ids"]
    with pytest.raises(DataFormatError, match="data files must share one of the suffixes"):
        load_raw({"train": str(tmp_path / "a.json"), "test": str(tmp_path / "b.txt")})


def test_loads_a_generating_function(tokenizer):
    dm = make("lit_pref.tasks:mood_preferences", tokenizer, val_split="test", max_train_samples=5, max_val_samples=3)
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (5, 3)
    expected = tasks.mood_preferences()["train"][0]
    assert tokenizer.decode(dm.splits["train"][0]["prompt_input_ids"], skip_special_tokens=True) == expected["prompt"]
    with pytest.raises(DataFormatError, match=r"cannot import 'lit_pref\.tasks:no_such_function'"):
        load_raw("lit_pref.tasks:no_such_function")
    with pytest.raises(DataFormatError, match=r"cannot import 'no_such_pkg\.mod:fn'"):
        load_raw("no_such_pkg.mod:fn")


def test_a_hub_name_goes_through_load_dataset_and_fails_offline(tokenizer, monkeypatch):
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)  # imported where data is loaded
    dm = PreferenceDataModule("lit-pref-tests/no-such-dataset", tokenizer_name_or_path=tokenizer, target="paired")
    with pytest.raises((ConnectionError, FileNotFoundError), match="lit-pref-tests/no-such-dataset"):
        dm.setup("fit")
    assert calls == [("lit-pref-tests/no-such-dataset", None)]


def test_a_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_raw(str(tmp_path / "missing.jsonl"))


def test_construction_loads_nothing_setup_does(tmp_path, tokenizer):
    path = tmp_path / "late.json"
    dm = PreferenceDataModule(str(path), tokenizer_name_or_path="/no/such/tokenizer", target="paired")
    assert dm.splits == {} and dm._tokenizer is None  # neither the data nor the tokenizer was read
    with pytest.raises(FileNotFoundError):
        dm.setup("fit")
    write(paired_rows(), path, "json")
    dm = PreferenceDataModule(str(path), tokenizer_name_or_path=tokenizer, target="paired", val_split=None)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 6
    splits = dm.splits
    dm.setup("validate")  # a second call keeps what the first built
    assert dm.splits is splits


def test_validation_split_falls_back_to_a_held_out_fraction_or_count(tokenizer):
    rows = Dataset.from_list(paired_rows(8))
    dm = make(rows, tokenizer, val_split="test", val_size=0.25)
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (6, 2)
    held_out = set(dm.splits["val"]["source"])
    assert held_out.isdisjoint(dm.splits["train"]["source"])
    assert sum(len(b["index"]) for b in dm.val_dataloader()) == 2
    assert sum(len(b["index"]) for b in dm.train_dataloader()) == 6
    assert set(make(rows, tokenizer, val_split="test", val_size=0.25).splits["val"]["source"]) == held_out  # seeded
    dm = make(rows, tokenizer, val_split="test", val_size=3)
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (5, 3)
    dm = make(rows, tokenizer, val_split="test")
    assert set(dm.splits) == {"train"} and dm.val_dataloader() == []
    with pytest.raises(DataFormatError, match=r"split 'training' not found; the dataset has \['train'\]"):
        make(rows, tokenizer, train_split="training")


# -------------------------------------------------------------------- shapes
def test_paired_batch_carries_margin_index_and_extras(tokenizer):
    dm = make(Dataset.from_list(paired_rows()), tokenizer)
    loader = dm.sequential_dataloader("train")
    batch = next(iter(loader))
    assert batch["prompt_input_ids"].shape[0] == 4 and batch["completion_input_ids"].shape[0] == 8
    assert batch["margin"].tolist() == [0.0, 0.5, 1.0, 1.5] and batch["margin"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["source"] == ["s0", "s1", "s2", "s3"]
    # Prompts left-padded, completions right-padded: the last prompt column is always real.
    assert batch["prompt_attention_mask"][:, -1].all() and batch["completion_attention_mask"][:, 0].all()
    assert torch.equal(batch["completion_mask"], batch["completion_attention_mask"])
    rows = dm.splits["train"]
    assert batch["completion_input_ids"][1, : len(rows[0]["rejected_input_ids"])].tolist() == rows[0]["rejected_input_ids"]


def test_implicit_hh_text_prompt(tokenizer):
    rows = []
    for i, (mood, topic) in enumerate([("happy", "rain"), ("sad", "sea"), ("happy", "home")]):
        history = HH.format(mood=mood, topic=topic)
        if i == 2:  # multi-turn: the split is after the *last* shared Assistant:
            history = history + " The day is good.\n\nHuman: Another?\n\nAssistant:"
        # The answers share their first word, and the first letters of their second word.
        rows.append({"chosen": history + " The great day", "rejected": history + " The grim day", "id": i})
    dm = make(Dataset.from_list(rows), tokenizer)
    train = dm.splits["train"]
    for i, row in enumerate(train):
        prompt = tokenizer.decode(row["prompt_input_ids"], skip_special_tokens=True)
        assert prompt.endswith("Assistant:") and prompt.count("\n\nHuman:") == (2 if i == 2 else 1)
        assert tokenizer.decode(row["chosen_input_ids"], skip_special_tokens=True) == " The great day"
        assert tokenizer.decode(row["rejected_input_ids"], skip_special_tokens=True) == " The grim day"
    assert train["id"] == [0, 1, 2]


def test_conversational_paired_explicit_and_implicit(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    explicit = tasks.preference_rows(4, conversational=True)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    a = make(Dataset.from_list(explicit), tokenizer).splits["train"]
    b = make(Dataset.from_list(implicit), tokenizer).splits["train"]
    for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert a[key] == b[key], key
    for row, source in zip(a, explicit, strict=True):
        assert row["prompt_input_ids"][0] == bos and row["prompt_input_ids"].count(bos) == 1
        full = tokenizer.apply_chat_template(source["prompt"] + source["chosen"], tokenize=False)
        assert row["prompt_input_ids"] + row["chosen_input_ids"] == tokenizer(full, add_special_tokens=False).input_ids
        assert eos in row["chosen_input_ids"] and eos in row["rejected_input_ids"]


def test_conversational_data_without_a_chat_template_fails_clearly(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    rows = tasks.preference_rows(2, conversational=True)
    with pytest.raises(DataFormatError, match="no chat template"):
        make(Dataset.from_list(rows), plain)


def test_unpaired_rows_with_bool_labels(tokenizer):
    rows = [
        {"prompt": "Write a happy line about rain:", "completion": " good warm day", "label": True, "w": 1.0},
        {"prompt": "Write a sad line about sea:", "completion": " joy", "label": False, "w": 2.0},
        {"prompt": "Write a sad line about home:", "completion": " dark", "label": True, "w": 3.0},
    ]
    dm = make(Dataset.from_list(rows), tokenizer, target="unpaired")
    batch = next(iter(dm.sequential_dataloader("train")))
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False, True]
    assert batch["w"] == [1.0, 2.0, 3.0]
    assert batch["completion_input_ids"].shape[0] == 3
    with pytest.raises(DataFormatError, match="row 1: column 'label' must be a bool"):
        make(Dataset.from_list([rows[0], {**rows[1], "label": None}]), tokenizer, target="unpaired")


def test_paired_rows_convert_to_unpaired(tokenizer):
    rows = paired_rows(3)
    dm = make(Dataset.from_list(rows), tokenizer, target="unpaired")
    train = dm.splits["train"]
    paired = expected_paired(tokenizer, rows)
    assert len(train) == 6 and train["label"] == [True, False] * 3
    assert train["index"] == list(range(6))
    assert train["source"] == ["s0", "s0", "s1", "s1", "s2", "s2"]
    for i in range(3):
        assert train[2 * i]["prompt_input_ids"] == train[2 * i + 1]["prompt_input_ids"] == paired[i]["prompt_input_ids"]
        assert train[2 * i]["completion_input_ids"] == paired[i]["chosen_input_ids"]
        assert train[2 * i + 1]["completion_input_ids"] == paired[i]["rejected_input_ids"]
    with pytest.raises(DataFormatError, match="'unpaired' dataset cannot be used where 'paired' data is needed"):
        make(Dataset.from_list([{"prompt": "p", "completion": "c", "label": True}]), tokenizer)


def test_prompt_only_keeps_the_prompt_text_and_extra_columns(tokenizer):
    dm = make(Dataset.from_list(tasks.prompt_rows(5)), tokenizer, target="prompt_only")
    batch = next(iter(dm.sequential_dataloader("train")))
    rows = tasks.prompt_rows(5)[:4]
    assert batch["prompt"] == [r["prompt"] for r in rows]
    assert batch["mood"] == [r["mood"] for r in rows]
    assert "completion_input_ids" not in batch
    for i, row in enumerate(rows):
        ids = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        assert ids == tokenizer(row["prompt"]).input_ids
    # Paired data feeds prompt-only algorithms too (chosen/rejected are dropped).
    dm = make(Dataset.from_list(paired_rows(2)), tokenizer, target="prompt_only")
    assert set(dm.splits["train"].column_names) == {"prompt", "prompt_input_ids", "margin", "source", "index"}


def test_sft_from_text_and_messages(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = make(Dataset.from_list([{"text": "The cat sat on the road."}]), tokenizer, target="sft").splits["train"][0]
    assert text["prompt_input_ids"] == [bos] and text["completion_input_ids"][-1] == eos
    assert all(text["completion_mask"])
    messages = [{"messages": r["prompt"] + r["completion"]} for r in tasks.sft_rows(3, conversational=True)]
    dm = make(Dataset.from_list(messages), tokenizer, target="sft")
    row = dm.splits["train"][0]
    assert row["prompt_input_ids"].count(bos) == 1 and bos not in row["completion_input_ids"]
    assert eos in row["completion_input_ids"]
    batch = next(iter(dm.sequential_dataloader("train")))
    assert batch["completion_mask"].sum().item() == sum(sum(r["completion_mask"]) for r in dm.splits["train"])
    # Paired data trains SFT on its chosen side.
    sft = make(Dataset.from_list(paired_rows(2)), tokenizer, target="sft").splits["train"]
    assert sft["completion_input_ids"] == expected_paired(tokenizer, paired_rows(2))["chosen_input_ids"]


# ---------------------------------------------------------------- truncation
def varied_rows():
    """Prompts of growing length with the same short answers."""
    return [
        {"prompt": "Write a happy line about rain" + " and rain" * i + ":", "chosen": " good day", "rejected": " bad"}
        for i in range(6)
    ]


def test_truncation_counts_are_kept_and_logged(tokenizer, logs):
    rows = varied_rows()
    lengths = [len(tokenizer(r["prompt"]).input_ids) for r in rows]
    limit = sorted(lengths)[2]  # three prompts over the limit
    dm = make(Dataset.from_list(rows), tokenizer, max_prompt_length=limit, max_length=None)
    assert dm.counts == {"train": {"truncated_prompt": 3, "truncated_completion": 0, "drop": 0, "short_prompt": 0, "bad": 0, "cut_image": 0}}
    assert all(len(p) <= limit for p in dm.splits["train"]["prompt_input_ids"])
    assert all(p[0] == tokenizer.bos_token_id for p in dm.splits["train"]["prompt_input_ids"])
    assert "train: 6 rows (paired → paired); 3 prompts and 0 completions truncated, 0 rows dropped; 6 rows kept" in logs.text

    logs.clear()
    dropped = make(Dataset.from_list(rows), tokenizer, max_prompt_length=limit, truncation_mode="drop")
    assert dropped.counts["train"] == {"truncated_prompt": 0, "truncated_completion": 0, "drop": 3, "short_prompt": 0, "bad": 0, "cut_image": 0}
    assert len(dropped.splits["train"]) == 3 and dropped.splits["train"]["index"] == [0, 1, 2]
    assert "3 rows dropped; 3 rows kept" in logs.text

    with pytest.raises(DataFormatError, match=r"^row 3: a row is longer than the limits"):
        make(Dataset.from_list(rows), tokenizer, max_prompt_length=limit, truncation_mode="error")
    with pytest.raises(DataFormatError, match="no train rows left after truncation"):
        make(Dataset.from_list(rows), tokenizer, max_prompt_length=1, truncation_mode="drop")


@pytest.mark.filterwarnings("ignore:.*completions were truncated")
def test_keep_start_and_completion_limits(tokenizer):
    rows = varied_rows()
    dm = make(Dataset.from_list(rows), tokenizer, max_prompt_length=4, max_completion_length=2, truncation_mode="keep_start")
    train = dm.splits["train"]
    for row, source in zip(train, rows, strict=True):
        assert row["prompt_input_ids"] == tokenizer(source["prompt"]).input_ids[:4]
        assert len(row["chosen_input_ids"]) == 2 and len(row["rejected_input_ids"]) == 2
    assert dm.counts["train"]["truncated_completion"] == 6


@pytest.mark.filterwarnings("ignore:.*completions were truncated")
@pytest.mark.filterwarnings("ignore:.*prompts were cut below")
def test_max_length_never_leaves_an_empty_completion(tokenizer):
    rows = varied_rows()
    kept = 0
    for max_length in (1, 2, 3, 9, 12):
        try:
            dm = make(Dataset.from_list(rows), tokenizer, max_length=max_length, max_prompt_length=None)
        except DataFormatError as error:
            assert "no train rows left" in str(error)
            continue
        batch = next(iter(dm.sequential_dataloader("train")))
        assert (batch["completion_mask"].sum(-1) > 0).all()
        widths = batch["prompt_attention_mask"].sum(-1).repeat_interleave(2) + batch["completion_attention_mask"].sum(-1)
        assert (widths <= max_length).all()
        kept += 1
    assert kept >= 3


def test_warns_when_most_completions_are_truncated(tokenizer):
    with pytest.warns(UserWarning, match="6 of 6 train completions were truncated"):
        make(Dataset.from_list(varied_rows()), tokenizer, max_completion_length=1)


def test_pad_equals_eos_keeps_eos_counted(tmp_path):
    tok = build_tiny_tokenizer(tasks.corpus(), pad_equals_eos=True)
    dm = make(Dataset.from_list(paired_rows(4)), tok)
    batch = next(iter(dm.sequential_dataloader("train")))
    eos = tok.eos_token_id
    lengths = batch["completion_attention_mask"].sum(-1)
    last_real = batch["completion_input_ids"].gather(1, (lengths - 1)[:, None]).squeeze(1)
    assert (last_real == eos).all()
    assert batch["completion_mask"].gather(1, (lengths - 1)[:, None]).all()
    assert torch.equal(batch["completion_mask"].sum(-1), lengths)


# -------------------------------------------------------- caching and logging
def test_file_backed_tokenisation_is_cached_by_fingerprint(tokenizer, tmp_path):
    path = write(paired_rows(), tmp_path / "data.json", "json")
    tokenizer.save_pretrained(tmp_path / "tok")
    # Each data module loads the tokenizer from its path itself: a new object, as in a new process.
    first = make(path, str(tmp_path / "tok"))
    files = [f["filename"] for f in first.splits["train"].cache_files]
    assert files and all(f.startswith(str(tmp_path / "hf_cache")) for f in files)
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    second = make(path, str(tmp_path / "tok"))
    assert second.tokenizer is not first.tokenizer
    assert second.fingerprint("train") == first.fingerprint("train")
    assert [f["filename"] for f in second.splits["train"].cache_files] == files
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps  # read back, not rewritten
    # Different limits are a different fingerprint.
    other = make(path, str(tmp_path / "tok"), max_prompt_length=3)
    assert other.fingerprint("train") != first.fingerprint("train")


def test_one_decoded_example_is_logged_with_completion_tokens_marked(tokenizer, logs):
    make(Dataset.from_list(tasks.preference_rows(2)), tokenizer)
    example = [r.getMessage() for r in logs.records if "example training row" in r.getMessage()]
    assert len(example) == 1
    text = example[0]
    first = tasks.preference_rows(2)[0]
    assert f"<|bos|>{first['prompt']}\n[chosen] ⟦" in text
    assert "\n[rejected] ⟦" in text and "⟦<|im_end|>⟧" in text
    words = first["chosen"].split()
    assert all(f"⟦ {w}⟧" in text for w in words)


# ------------------------------------------------------------------ bad input
def test_missing_columns_name_the_columns_found_and_the_shapes_accepted(tokenizer):
    with pytest.raises(DataFormatError) as info:
        make(Dataset.from_list([{"question": "q", "answer": "a"}]), tokenizer)
    assert "['answer', 'question']" in str(info.value) and "paired: (prompt, chosen, rejected)" in str(info.value)


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"chosen": None}, "row 2: column 'chosen' is NoneType"), ({"rejected": " "}, "row 2: column 'rejected' is empty")],
)
def test_bad_fields_name_the_row(tokenizer, bad, message):
    rows = paired_rows(4)
    rows[2].update(bad)
    with pytest.raises(DataFormatError, match=message):
        make(Dataset.from_list(rows), tokenizer)


def test_a_tokenizer_without_pad_token_gets_eos_with_a_warning(tokenizer, tmp_path):
    nopad = copy.deepcopy(tokenizer)
    nopad.pad_token = None
    nopad.save_pretrained(tmp_path / "nopad")
    with pytest.warns(UserWarning, match="has no pad token; using its EOS token"):
        loaded = load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token_id == loaded.eos_token_id
    dm = PreferenceDataModule(Dataset.from_list(paired_rows(2)), tokenizer_name_or_path=str(tmp_path / "nopad"),
                              target="paired", val_split=None)
    with pytest.warns(UserWarning, match="no pad token"):
        dm.setup("fit")
    assert dm.collator.pad_token_id == dm.tokenizer.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(tokenizer)  # one with a pad token: no warning
