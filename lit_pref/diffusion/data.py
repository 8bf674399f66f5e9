"""Rows for the diffusion modules through ``PreferenceDataModule``: prompts (DDPO) and image
preference pairs (Diffusion-DPO).

Nothing is tokenised here: the text encoder's tokenizer runs in the module, at the fixed length
CLIP expects. The data module asks the module it feeds for its :class:`ImageRows`
(``module.image_rows``) and, when there is one, builds splits and batches with it instead of
its text pipeline.

Image columns (``chosen``, ``rejected``) may hold ``PIL`` images (a ``datasets.Image``
column), ``{"bytes": …}`` / ``{"path": …}`` dicts, file paths, or ``[H, W, 3]`` uint8 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_pref.data.formats import DataFormatError
from lit_pref.vision.images import load_image

if TYPE_CHECKING:
    from datasets import Dataset
    from PIL import Image

ImageTarget = Literal["prompt_only", "image_pairs"]
COLUMNS: dict[str, tuple[str, ...]] = {"prompt_only": ("prompt",), "image_pairs": ("prompt", "chosen", "rejected")}
# The data module's working columns, not the rows' metadata.
WORKING_COLUMNS = ("_row", "index")


def open_image(value: Any) -> Image.Image:
    """:func:`lit_pref.vision.images.load_image`, a cell that is no image reported as a data error."""
    try:
        return load_image(value)
    except TypeError as error:
        raise DataFormatError(str(error)) from None


def image_tensor(image: Image.Image, resolution: int) -> Tensor:
    """``[3, r, r]`` in [−1, 1]: the shorter side resized to ``r``, then centre-cropped (the
    preprocessing of Stable Diffusion's training scripts)."""
    from PIL import Image

    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0


@dataclass
class ImageRows:
    """How a diffusion module's rows are checked and batched.

    Args:
        target: ``prompt_only`` (DDPO: ``prompt`` plus any metadata columns) or ``image_pairs``
            (Diffusion-DPO: ``prompt``, ``chosen``, ``rejected``).
        resolution: image side the pairs are resized and cropped to.
    """

    target: ImageTarget
    resolution: int = 512

    def build_split(self, name: str, raw: Dataset) -> Dataset:
        """Check ``raw``'s columns and prompts; the data module's working columns are dropped."""
        needed = COLUMNS[self.target]
        missing = [c for c in needed if c not in raw.column_names]
        if missing:
            raise DataFormatError(
                f"the {name} data has columns {raw.column_names}; {self.target} rows need {list(needed)} "
                f"(missing {missing})"
            )
        if len(raw) == 0:
            raise DataFormatError(f"the {name} data has no rows")
        for i, prompt in enumerate(raw["prompt"]):
            if not isinstance(prompt, str):
                raise DataFormatError(f"row {i} of the {name} data: prompt must be text, got {type(prompt).__name__}")
        ds = raw.remove_columns([c for c in WORKING_COLUMNS if c in raw.column_names])
        rank_zero_info(f"{name}: {len(ds)} {self.target} rows")
        return ds

    def describe(self, row: dict[str, Any]) -> str:
        """One line showing a training row (the data module logs it at start-up)."""
        extra = {k: v for k, v in row.items() if k != "prompt"}
        if self.target == "image_pairs":
            sizes = {k: open_image(row[k]).size for k in ("chosen", "rejected")}
            return f"example training row: prompt {row['prompt']!r}, image sizes {sizes} → {self.resolution} px"
        return f"example training row: prompt {row['prompt']!r}, metadata {extra}"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate: ``prompt`` (texts), ``metadata`` (the other columns per row) and, for pairs,
        ``chosen_pixels`` / ``rejected_pixels`` ``[B, 3, r, r]`` in [−1, 1]."""
        batch: dict[str, Any] = {"prompt": [r["prompt"] for r in rows]}
        if self.target == "image_pairs":
            for side in ("chosen", "rejected"):
                batch[f"{side}_pixels"] = torch.stack([image_tensor(open_image(r[side]), self.resolution) for r in rows])
        else:
            batch["metadata"] = [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
        return batch
