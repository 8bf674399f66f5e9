"""Building a set-up ``PreferenceDataModule`` in one call, for the data tests."""

from __future__ import annotations

from lit_pref.data.datamodule import PreferenceDataModule


def make(source, tokenizer, target="paired", **kwargs):
    kwargs.setdefault("val_split", None)
    kwargs.setdefault("batch_size", 4)
    dm = PreferenceDataModule(source, tokenizer_name_or_path=tokenizer, target=target, **kwargs)
    dm.setup("fit")
    return dm
