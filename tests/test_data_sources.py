"""Data as distributed: compressed files, directories of shards, HH-RLHF's rows, the bad-row policy,
empty and corrupt files, conversation roles, prompts cut too short, and hub ids with no network."""

from __future__ import annotations

import bz2
import gzip
import json
import re
import time
import warnings
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import pytest
from data_helpers import isolated_offline_datasets, make  # noqa: F401 (an autouse fixture)
from datasets import Dataset

import lit_pref.data.sources as sources
from lit_pref import tasks
from lit_pref.data.datamodule import PreferenceDataModule, load_raw
from lit_pref.data.formats import DataFormatError, normalise_row

HH_TURN = "\n\nHuman: {question}\n\nAssistant:"
# Where the generated HH file has an empty chosen answer (as Anthropic's harmless-base/test.jsonl.gz
# has at four rows): with and without a trailing space after "Assistant:".
EMPTY_CHOSEN = (3, 11, 17, 25)


def hh_rows(n: int = 40, empty_chosen: tuple[int, ...] = EMPTY_CHOSEN) -> list[dict[str, str]]:
    """Rows shaped like Anthropic's hh-rlhf files: ``chosen``/``rejected`` transcripts sharing the
    conversation up to the last ``Assistant:``; every third row has two turns."""
    rows = []
    for i, (prompt, chosen, rejected) in enumerate(
        (r["prompt"], r["chosen"], r["rejected"]) for r in tasks.preference_rows(n, seed=3)
    ):
        history = HH_TURN.format(question=prompt)
        if i % 3 == 0:
            history = HH_TURN.format(question="hello there") + " Hi, how can I help?" + history
        answer = ("", " ")[i % 2] if i in empty_chosen else chosen
        rows.append({"chosen": history + answer, "rejected": history + rejected})
    return rows


def write_jsonl(rows, path: Path, opener=open) -> Path:
    with opener(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


# ------------------------------------------------------ compressed files and shards
@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz", ".jsonl.bz2", ".csv.gz", ".parquet"])
def test_compressed_files_and_parquet_load_like_the_rows_in_memory(tokenizer, tmp_path, suffix):
    rows = hh_rows(12, empty_chosen=())
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl.gz":
        write_jsonl(rows, path, gzip.open)
    elif suffix == ".jsonl.bz2":
        write_jsonl(rows, path, bz2.open)
    elif suffix == ".json.gz":
        with gzip.open(path, "wt") as f:
            json.dump(rows, f)
    elif suffix == ".csv.gz":
        Dataset.from_list(rows).to_pandas().to_csv(path, index=False)
    else:
        Dataset.from_list(rows).to_parquet(str(path))
    loaded = make(str(path), tokenizer).splits["train"]
    expected = make(Dataset.from_list(rows), tokenizer).splits["train"]
    for column in (*TOKEN_COLUMNS, "index"):
        assert loaded[column] == expected[column], column


def test_a_directory_of_shards_loads_its_splits_in_file_order(tokenizer, tmp_path):
    first, second, test = hh_rows(10, ()), hh_rows(14, ())[10:], hh_rows(6, ())
    shards = tmp_path / "hh"
    shards.mkdir()
    write_jsonl(first, shards / "train-00000-of-00002.jsonl.gz", gzip.open)
    write_jsonl(second, shards / "train-00001-of-00002.jsonl.gz", gzip.open)
    write_jsonl(test, shards / "test-00000-of-00001.jsonl.gz", gzip.open)
    (shards / "README.md").write_text("not data")
    dm = make(str(shards), tokenizer, val_split="test")
    expected_train = make(Dataset.from_list(first + second), tokenizer).splits["train"]
    expected_val = make(Dataset.from_list(test), tokenizer).splits["train"]
    for column in TOKEN_COLUMNS:
        assert dm.splits["train"][column] == expected_train[column]
        assert dm.splits["val"][column] == expected_val[column]


def test_a_directory_without_data_files_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFormatError) as info:
        load_raw(str(tmp_path))
    assert str(info.value) == (
        f"directory {str(tmp_path)!r} holds no data files (.csv, .json, .jsonl, .parquet, optionally compressed "
        "(.gz, .bz2, .xz, .zst)) and was not written by save_to_disk"
    )


# --------------------------------------------------------------- bad-row policy
def test_hh_bad_rows_stop_the_run_by_default_naming_the_row_of_the_file(tokenizer, tmp_path):
    path = write_jsonl(hh_rows(), tmp_path / "test.jsonl.gz", gzip.open)
    with pytest.raises(DataFormatError) as info:
        make(str(path), tokenizer)
    assert str(info.value) == (
        f"row 3 of {path}: column 'chosen' is empty; data.bad_rows=skip leaves such rows out"
    )


def test_hh_skip_counts_and_lists_the_rows_of_the_file(tokenizer, tmp_path):
    rows = hh_rows()
    path = write_jsonl(rows, tmp_path / "test.jsonl.gz", gzip.open)
    with pytest.warns(UserWarning) as caught:
        dm = make(str(path), tokenizer, bad_rows="skip")
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert skipped == [
        f"train: skipped 4 of 40 rows that do not fit the paired shape (bad_rows=skip): rows 3, 11, 17, 25 of "
        f"{path}; first: row 3 of {path}: column 'chosen' is empty"
    ]
    assert dm.counts["train"]["bad"] == 4
    good = [r for i, r in enumerate(rows) if i not in EMPTY_CHOSEN]
    expected = make(Dataset.from_list(good), tokenizer).splits["train"]
    for column in TOKEN_COLUMNS:
        assert dm.splits["train"][column] == expected[column]


def test_with_val_size_a_bad_row_is_named_by_its_row_in_the_file(tokenizer, tmp_path):
    rows = hh_rows(40, empty_chosen=(3,))
    path = write_jsonl(rows, tmp_path / "test.jsonl", open)
    # The held-out split shuffles: row 3 of the file is elsewhere in the shuffled training split.
    shuffled = Dataset.from_list(rows).train_test_split(test_size=0.25, seed=0)
    landed = [i for name in ("train", "test") for i, r in enumerate(shuffled[name]) if r["chosen"] == rows[3]["chosen"]]
    assert landed != [3]
    with pytest.raises(DataFormatError, match=rf"^row 3 of {re.escape(str(path))}: column 'chosen' is empty"):
        make(str(path), tokenizer, val_size=0.25)


def test_with_val_size_skipped_rows_are_listed_by_their_rows_in_the_file(tokenizer, tmp_path):
    path = write_jsonl(hh_rows(), tmp_path / "test.jsonl.gz", gzip.open)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = make(str(path), tokenizer, val_size=0.25, bad_rows="skip")
    listed = []
    for w in caught:
        found = re.search(r"rows? ([\d, ]+) of ", str(w.message))
        if "skipped" in str(w.message) and found:
            listed += [int(n) for n in found.group(1).split(", ")]
    assert sorted(listed) == list(EMPTY_CHOSEN)
    assert dm.counts["train"]["bad"] + dm.counts["val"]["bad"] == 4
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 36


def test_a_bad_row_in_a_shard_is_named_in_its_own_file(tokenizer, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(hh_rows(8, ()), shards / "train-00000-of-00002.jsonl", open)
    second = write_jsonl(hh_rows(8, empty_chosen=(2,)), shards / "train-00001-of-00002.jsonl", open)
    with pytest.raises(DataFormatError, match=rf"^row 2 of {re.escape(str(second))}: column 'chosen' is empty"):
        make(str(shards), tokenizer)
    with pytest.warns(UserWarning, match=rf"rows? 2 of {re.escape(str(second))}; first"):
        dm = make(str(shards), tokenizer, bad_rows="skip")
    assert len(dm.splits["train"]) == 15


def test_skip_covers_rows_that_fail_in_tokenisation_but_not_truncation_mode_error(tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    no_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}
    rows = Dataset.from_list([good, no_answer, good])
    with pytest.raises(DataFormatError, match=r"^row 1: the conversation has no assistant turn to train on"):
        make(rows, tokenizer, target="sft")
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 rows .*: row 1; first: row 1: the conversation has no assistant"):
        dm = make(rows, tokenizer, target="sft", bad_rows="skip")
    assert len(dm.splits["train"]) == 2
    long_rows = Dataset.from_list([{"prompt": "a b c d e f g h", "chosen": " x", "rejected": " y"}] * 2)
    with pytest.raises(DataFormatError, match=r"^row 0: a row is longer than the limits"):
        make(long_rows, tokenizer, max_prompt_length=2, truncation_mode="error", bad_rows="skip")


def test_only_bad_rows_left_is_one_line(tokenizer):
    rows = Dataset.from_list([{"prompt": "p", "chosen": "", "rejected": "r"}] * 2)
    with pytest.raises(DataFormatError) as info, pytest.warns(UserWarning, match="skipped 2 of 2 rows"):
        make(rows, tokenizer, bad_rows="skip")
    assert str(info.value) == (
        "no train rows left: all 2 bad rows were skipped, 0 more dropped by truncation; first bad one: "
        "row 0: column 'chosen' is empty"
    )


def test_bad_rows_must_be_error_or_skip():
    with pytest.raises(ValueError, match="bad_rows must be 'error' or 'skip', got 'drop'"):
        PreferenceDataModule(bad_rows="drop")  # type: ignore[arg-type]


# ----------------------------------------------------- empty and corrupt inputs
def _gzip_bytes(text: str) -> bytes:
    return gzip.compress(text.encode())


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "data file '{path}' is empty (0 bytes)"),
        ("blank.jsonl", b"\n\n  \n", "data file '{path}' holds no rows (only whitespace)"),
        ("empty.jsonl.gz", _gzip_bytes(""), "data file '{path}' holds no rows (only whitespace)"),
        ("list.json", b"[]", "data file '{path}' holds no rows ([])"),
        ("header.csv", b"prompt,chosen,rejected\n", "data file '{path}' holds no rows (a header line only)"),
        (
            "corrupt.jsonl",
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b",\n'
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
            "data file '{path}' line 2: not valid JSON (Expecting property name enclosed in double quotes, column 31)",
        ),
        (
            "corrupt.jsonl.gz",
            _gzip_bytes('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", chosen: "b"}\n'),
            "data file '{path}' line 3: not valid JSON (Expecting property name enclosed in double quotes, column 17)",
        ),
        (
            "document.json",
            b'[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a" "chosen": "b"}\n]\n',
            "data file '{path}' line 3: not valid JSON (Expecting ',' delimiter, column 18)",
        ),
        (
            "scalars.jsonl",
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n',
            "data file '{path}' line 2: expected a JSON object per line, got list",
        ),
        ("fake.jsonl.gz", b"plain text, not gzip", "data file '{path}' is not a readable json file: Not a gzipped file (b'pl')"),
    ],
    ids=["empty", "blank", "empty-gz", "empty-list", "header-only", "corrupt-line", "corrupt-line-gz",
         "corrupt-document", "not-an-object", "not-gzip"],
)
def test_empty_and_corrupt_files_are_one_line(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError) as info:
        make(str(path), tokenizer)
    assert str(info.value) == message.format(path=path)


def test_shards_that_disagree_on_columns_are_one_line(tokenizer, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    first = write_jsonl([{"prompt": "a", "chosen": "b", "rejected": "c"}], shards / "train-0.jsonl")
    second = write_jsonl([{"prompt": "a", "chosen": "b", "other": "c"}], shards / "train-1.jsonl")
    with pytest.raises(DataFormatError) as info:
        make(str(shards), tokenizer)
    assert str(info.value).startswith(f"cannot read {first}, {second}: CastError: Couldn't cast prompt: string")
    assert str(info.value).endswith("because column names don't match")


@pytest.mark.parametrize(
    "dataset", [Dataset.from_list([]), Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})]
)
def test_an_empty_in_memory_dataset_is_one_line(tokenizer, dataset):
    with pytest.raises(DataFormatError) as info:
        make(dataset, tokenizer)
    assert str(info.value) == "the train data (split 'train' of the dataset) has no rows"


def test_an_empty_split_of_a_file_names_the_file(tokenizer, tmp_path):
    path = write_jsonl(hh_rows(10, ()), tmp_path / "hh.jsonl", open)
    with pytest.raises(DataFormatError) as info:
        make(str(path), tokenizer, max_train_samples=0)
    assert str(info.value) == f"the train data (split 'train' of {path}) has no rows"


# ------------------------------------------------------------- conversation roles
@pytest.mark.parametrize(
    ("role", "hint"),
    [("usr", "; did you mean 'user'?"), ("human", "; did you mean 'user'?"), ("gpt", "; did you mean 'assistant'?"),
     ("narrator", "")],
)
def test_conversation_roles_are_checked(role, hint):
    row = {"messages": [{"role": role, "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataFormatError) as info:
        normalise_row(row, 4, "language_modeling")
    assert str(info.value) == (
        f"row 4: column 'messages' message 0 has role {role!r}; expected one of system, user, assistant, tool{hint}"
    )
    for ok in ("system", "user", "assistant", "tool"):
        normalise_row({"messages": [{"role": ok, "content": "x"}]}, 0, "language_modeling")


def test_rows_with_unknown_roles_can_be_skipped(tokenizer):
    good = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    bad = {"prompt": [{"role": "usr", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    with pytest.warns(UserWarning, match=r"rows? 1; first: row 1: column 'prompt' message 0 has role 'usr'"):
        dm = make(Dataset.from_list([good, bad, good]), tokenizer, target="sft", bad_rows="skip")
    assert len(dm.splits["train"]) == 2


# ---------------------------------------------------------- prompts cut too short
def test_prompts_cut_below_the_floor_are_counted_and_warned_with_the_fix(tokenizer):
    long_answer = " good" * 30
    rows = [{"prompt": f"Write a happy line about rain number {i}:", "chosen": long_answer, "rejected": " bad"}
            for i in range(4)]
    rows.append({"prompt": "Hi:", "chosen": " good", "rejected": " bad"})  # short, and not cut
    with pytest.warns(UserWarning) as caught:
        dm = make(Dataset.from_list(rows), tokenizer, max_length=34)
    cut = [len(p) for p in dm.splits["train"]["prompt_input_ids"][:4]]
    assert all(n < 8 for n in cut)
    assert dm.counts["train"]["short_prompt"] == 4
    assert [str(w.message) for w in caught if "prompts were cut" in str(w.message)] == [
        "4 of 5 train prompts were cut below 8 tokens (min_prompt_length=8, max_length=34, max_prompt_length=512), "
        "e.g. rows 0, 1, 2: their completions answer a prompt the model no longer sees; raise max_length, set "
        "max_completion_length so completions leave the prompt room, or use truncation_mode=drop"
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*prompts were cut")
        warnings.filterwarnings("ignore", message=".*completions were truncated")
        quiet = make(Dataset.from_list(rows), tokenizer, max_length=34, min_prompt_length=None)
        # A prompt limit below the floor is what was asked for, not a surprise.
        make(Dataset.from_list(rows), tokenizer, max_prompt_length=4, max_length=None)
    assert quiet.counts["train"]["short_prompt"] == 0


# ----------------------------------------------------- local paths and hub ids
@pytest.mark.parametrize(
    ("source", "local"),
    [("./data", True), ("/abs/x", True), ("~/x", True), ("a/b/c", True), ("a\\b", True), ("../x", True),
     ("org/name", False), ("gpt2", False), ("Qwen/Qwen2-0.5B-Instruct", False), ("org/na..me", True)],
)
def test_what_looks_local(source, local):
    assert sources.looks_local(source) is local


def test_an_existing_first_component_makes_org_name_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not sources.looks_local("outputs/does-not-exist")
    (tmp_path / "outputs").mkdir()
    assert sources.looks_local("outputs/does-not-exist")
    with pytest.raises(FileNotFoundError) as info:
        load_raw("outputs/does-not-exist")
    assert str(info.value) == (
        f"dataset path 'outputs/does-not-exist' does not exist ({tmp_path / 'outputs'} exists, does-not-exist does not)"
    )


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Offline mode off, and the Hub endpoint a local port nothing listens on: the probe fails at once."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(sources, "_reachable", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


def test_a_hub_dataset_with_no_network_fails_fast_and_says_how_to_use_local_files(unreachable_hub):
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as info:
        load_raw("lit-pref-tests/no-such-dataset")
    elapsed = time.perf_counter() - start
    assert str(info.value).startswith("Couldn't reach 'lit-pref-tests/no-such-dataset' on the Hub")
    assert str(info.value).endswith(
        "; dataset 'lit-pref-tests/no-such-dataset' is not a local path and the Hugging Face Hub cannot be reached "
        "(offline); download it where the Hub is reachable (`hf download lit-pref-tests/no-such-dataset`) and pass "
        "the local directory or file instead (e.g. ./no-such-dataset)"
    )
    assert "\n" not in str(info.value)
    # Switched to offline mode, so what is cached would still load; measured ~0.1 s, not a minute of retries.
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert elapsed < 2.0


def test_the_hub_probe_answers_within_its_timeout(unreachable_hub):
    start = time.perf_counter()
    assert sources.hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - start < 2.0
