"""Image preprocessing through transformers' `Qwen2VLImageProcessorPil` configured for Qwen3-VL
(patch 16, merge 2, mean/std 0.5), and expansion of image placeholders in token sequences.

No torchvision: the PIL backend does the resizing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from dreamr_jax.config.schema import ModelConfig, VisionConfig

QWEN3_VL_MEAN = (0.5, 0.5, 0.5)
QWEN3_VL_STD = (0.5, 0.5, 0.5)


def make_image_processor(
    vision: VisionConfig, *, min_pixels: int = 32 * 32, max_pixels: int = 1024 * 1024
) -> Qwen2VLImageProcessorPil:
    """The transformers image processor for a Qwen3-VL vision tower."""
    return Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        image_mean=list(QWEN3_VL_MEAN),
        image_std=list(QWEN3_VL_STD),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )


def process_images(
    processor: Qwen2VLImageProcessorPil, images: Sequence[Image.Image]
) -> tuple[np.ndarray, np.ndarray]:
    """Packed patches `[patches, C*T*P*P]` float32 and grids `[images, 3]` int64."""
    out = processor(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def image_token_count(cfg: ModelConfig, grid_thw: Sequence[int]) -> int:
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // cfg.vision.spatial_merge_size**2


def image_placeholder(cfg: ModelConfig, grid_thw: Sequence[int]) -> list[int]:
    """Token ids standing for one image: vision start, one image token per merged patch, end."""
    return (
        [cfg.vision_start_token_id]
        + [cfg.image_token_id] * image_token_count(cfg, grid_thw)
        + [cfg.vision_end_token_id]
    )


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token rows to one length: ids `[batch, seq]` int32 and mask `[batch, seq]` bool."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row) :] = row
            mask[i, length - len(row) :] = True
    return ids, mask
