"""Data: formats, tokenisation, collation and the shared data module."""

from lit_pref.data.collate import Collator
from lit_pref.data.datamodule import PreferenceDataModule, load_raw
from lit_pref.data.formats import DataFormatError, detect_shape

__all__ = ["Collator", "DataFormatError", "PreferenceDataModule", "detect_shape", "load_raw"]
