"""Item 3: precomputed reference log-probs with images, under a cache key that covers the pixels."""

from __future__ import annotations

import json
import random
from functools import partial

import torch
from rl_helpers import make_trainer

from lit_pref.data.datamodule import PreferenceDataModule
from lit_pref.modules import DPO
from lit_pref.ops import batch_logps
from lit_pref.vision import task


def write_rows(tmp_path, n: int = 6):
    """A JSON-lines file whose rows name their images by path."""
    rows = task.colour_preferences(train=n, test=1)["train"]
    lines = []
    for i, row in enumerate(rows):
        path = tmp_path / f"image{i}.png"
        row["images"][0].save(path)
        lines.append(
            json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")} | {"images": [str(path)]})
        )
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "rows.jsonl"


def precompute(tiny_vlm_dir, source, tmp_path):
    module = DPO(model_name_or_path=str(tiny_vlm_dir), precompute_ref_logps=True, ref_cache_dir=str(tmp_path / "cache"),
                 optimizer=partial(torch.optim.SGD, lr=0.0))  # fmt: skip
    data = PreferenceDataModule(
        str(source), tokenizer_name_or_path=str(tiny_vlm_dir), val_split=None, batch_size=3
    )
    make_trainer(tmp_path, max_steps=1).fit(module, data)
    return module, data, module.ref_logp_table.tables["train"][1]


def test_precomputed_reference_with_images_keys_on_the_pixels(tiny_vlm_dir, tmp_path):
    source = write_rows(tmp_path)
    module, data, table = precompute(tiny_vlm_dir, source, tmp_path)
    # The table holds the reference's log-probs of each row, images included.
    batch = data.collator([data.splits["train"][i] for i in range(len(data.splits["train"]))])
    chosen, rejected = batch_logps(module.policy, batch).pairs()  # lr 0: the policy is still the reference
    torch.testing.assert_close(
        table[batch["index"]], torch.stack([chosen.sum, rejected.sum], -1), atol=1e-5, rtol=0
    )
    caches = sorted((tmp_path / "cache").glob("ref_logps-*.pt"))
    assert len(caches) == 1
    # Same data and images: the cache is reused.
    _, _, again = precompute(tiny_vlm_dir, source, tmp_path)
    assert sorted((tmp_path / "cache").glob("ref_logps-*.pt")) == caches
    torch.testing.assert_close(again, table)
    # One image rewritten in place (same path, same rows file): a new key, and new values for its row only.
    task.draw("green", random.Random(123)).save(tmp_path / "image0.png")
    _, data, changed = precompute(tiny_vlm_dir, source, tmp_path)
    assert len(list((tmp_path / "cache").glob("ref_logps-*.pt"))) == 2
    index = data.splits["train"]["index"]
    first = index.index(0)
    assert (changed[first] - table[first]).abs().max() > 1e-4
    others = [i for i in index if i != 0]
    torch.testing.assert_close(changed[others], table[others])
