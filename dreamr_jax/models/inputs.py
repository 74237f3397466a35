"""Host-side preparation of model inputs: everything that depends on Python-level image sizes.

Image grids decide how many patches and visual tokens there are, so the positions and gather
tables derived from them are computed here in NumPy, once per request, and handed to jitted code
as plain arrays (`ModelInputs`). The formulas follow transformers' Qwen3-VL (`get_rope_index`,
`get_vision_position_ids`, `get_vision_interpolation_indices_and_weights`).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np

from dreamr_jax.config.schema import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionInputs:
    """Patches of all images of a batch, packed in the order their tokens appear.

    pixel_values: `[patches, channels * temporal * patch * patch]`.
    interp_index, interp_weight: `[patches, 4]` bilinear taps into the learned position table.
    patch_hw: `[patches, 2]` (row, col) of every patch, for the 2D rotary.
    segment_ids: `[patches]` which image frame a patch belongs to (attention stays inside it).
    """

    pixel_values: jax.Array
    interp_index: jax.Array
    interp_weight: jax.Array
    patch_hw: jax.Array
    segment_ids: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelInputs:
    """A padded batch of token sequences.

    input_ids: `[batch, seq]` int32. attention_mask: `[batch, seq]` bool, False on padding.
    positions: `[3, batch, seq]` int32 M-RoPE positions (T, H, W).
    vision: packed image patches, or None for text-only batches.
    chunk_mask: optional `[batch, seq, seq]` bool, which tokens of this chunk each token may attend
      to, replacing the causal rule inside the chunk (tree verification and packed judge training
      put several branches in one row; see `branch_layout`).
    cache_mask: optional `[batch, seq, max_len]` bool, with a cache: which of its slots (this
      chunk's included) each token may attend to, on top of the rule that a token sees the valid
      slots up to its own (steps decoded side by side in one row: `speculative.runner.Branches`).
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    positions: jax.Array
    vision: VisionInputs | None = None
    chunk_mask: jax.Array | None = None
    cache_mask: jax.Array | None = None


def vision_patch_hw(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """`[patches, 2]` (row, col) of each patch, in merge-block order, repeated over frames."""
    out = []
    for t, h, w in np.asarray(grid_thw).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int32)


def vision_interpolation(
    grid_thw: np.ndarray, side: int, merge: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling of the square `side x side` learned position table to every image grid:
    `[patches, 4]` indices into the flattened table and `[patches, 4]` weights."""
    grid = np.asarray(grid_thw).reshape(-1, 3)
    hw = vision_patch_hw(grid, merge)
    counts = np.prod(grid, axis=-1)
    heights, widths = np.repeat(grid[:, 1], counts), np.repeat(grid[:, 2], counts)
    h_taps, h_w = _bilinear_taps(hw[:, 0], heights, side)
    w_taps, w_w = _bilinear_taps(hw[:, 1], widths, side)
    idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return idx.astype(np.int32), wts.astype(np.float32)


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int):
    """Two taps into a `side`-long axis and their weights for target indices on axes of `size`
    (align_corners=True, clamped at the border, as `F.interpolate(mode="bilinear")`)."""
    src = (
        index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    )
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
    return taps, weights.astype(np.float32)


def prepare_vision(
    cfg: ModelConfig, pixel_values: np.ndarray, image_grid_thw: np.ndarray
) -> VisionInputs:
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    merge = cfg.vision.spatial_merge_size
    n_patches = int(np.prod(grid, axis=-1).sum())
    pixel_values = np.asarray(pixel_values)
    if pixel_values.shape != (n_patches, cfg.vision.patch_dim):
        raise ValueError(
            f"pixel_values has shape {pixel_values.shape}, but image_grid_thw {grid.tolist()} "
            f"needs ({n_patches}, {cfg.vision.patch_dim})"
        )
    if np.any(grid[:, 1:] % merge):
        raise ValueError(
            f"image_grid_thw {grid.tolist()}: height and width must be multiples of "
            f"spatial_merge_size {merge}"
        )
    side = round(cfg.vision.num_position_embeddings**0.5)
    interp_index, interp_weight = vision_interpolation(grid, side, merge)
    frames = np.repeat(
        np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    )
    return VisionInputs(
        pixel_values=pixel_values.astype(np.float32),
        interp_index=interp_index,
        interp_weight=interp_weight,
        patch_hw=vision_patch_hw(grid, merge),
        segment_ids=frames.astype(np.int32),
    )


def empty_vision(patch_dim: int) -> VisionInputs:
    """Vision inputs with no patches (a batch of text-only examples), for `pad_vision`."""
    return VisionInputs(
        pixel_values=np.zeros((0, patch_dim), np.float32),
        interp_index=np.zeros((0, 4), np.int32),
        interp_weight=np.zeros((0, 4), np.float32),
        patch_hw=np.zeros((0, 2), np.int32),
        segment_ids=np.zeros((0,), np.int32),
    )


def pad_vision(vision: VisionInputs, total_patches: int, merge: int) -> VisionInputs:
    """Appends blank patches up to `total_patches`, so batches with different image sizes share
    one compiled shape. The blank patches form their own segment after every real one; their
    merged features come last and no image token ever gathers them."""
    n = vision.pixel_values.shape[0]
    extra = total_patches - n
    if extra < 0:
        raise ValueError(f"{n} patches do not fit in total_patches={total_patches}")
    if extra % (merge * merge):
        raise ValueError(f"padding of {extra} patches is not a multiple of merge^2={merge**2}")
    if extra == 0:
        return vision

    def grow(x, fill=0):
        pad = np.full((extra,) + x.shape[1:], fill, x.dtype)
        return np.concatenate([np.asarray(x), pad], axis=0)

    next_segment = int(np.max(vision.segment_ids)) + 1 if n else 0
    return VisionInputs(
        pixel_values=grow(vision.pixel_values),
        interp_index=grow(vision.interp_index),
        interp_weight=grow(vision.interp_weight),
        patch_hw=grow(vision.patch_hw),
        segment_ids=grow(vision.segment_ids, next_segment),
    )


def mrope_positions(
    cfg: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions `[3, batch, seq]` and the next free position `[batch]` of every row.

    Text tokens advance all three rows together; the tokens of an image take (t, h, w) grid
    coordinates offset by the current position, after which text resumes at the offset plus the
    larger merged side. Padding gets position 0 (it is masked anyway).
    """
    batch, seq = input_ids.shape
    merge = cfg.vision.spatial_merge_size
    grids = (
        iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist())
        if image_grid_thw is not None
        else iter(())
    )
    positions = np.zeros((3, batch, seq), np.int32)
    next_position = np.zeros((batch,), np.int32)
    for b in range(batch):
        keep = attention_mask[b].astype(bool)
        is_image = input_ids[b][keep] == cfg.image_token_id
        pieces, current = [], 0
        for image, group in itertools.groupby(is_image.tolist()):
            length = len(list(group))
            if not image:
                pieces.append(np.broadcast_to(np.arange(length) + current, (3, length)))
                current += length
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(
                    f"row {b} has more image-token runs than image_grid_thw entries"
                ) from None
            gh, gw = h // merge, w // merge
            if t * gh * gw != length:
                raise ValueError(
                    f"row {b}: an image run of {length} tokens does not match grid "
                    f"{[t, h, w]} ({t * gh * gw} tokens after merging)"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(h, w) // merge
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, keep] = row
        next_position[b] = row.max() + 1 if row.size else 0
    return positions, next_position


def prepare_inputs(
    cfg: ModelConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
) -> tuple[ModelInputs, np.ndarray]:
    """`ModelInputs` and the next M-RoPE position `[batch]` from transformers-style arrays.

    Checks that the number of image tokens matches the grids, so a mismatch is an error here
    rather than silently misplaced features inside a jitted function.
    """
    input_ids = np.asarray(input_ids).astype(np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids, dtype=bool)
    attention_mask = np.asarray(attention_mask).astype(bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
        )
    n_image_tokens = int(((input_ids == cfg.image_token_id) & attention_mask).sum())
    vision = None
    if pixel_values is not None:
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
        expected = int((np.prod(grid, axis=-1) // cfg.vision.spatial_merge_size**2).sum())
        if n_image_tokens != expected:
            raise ValueError(
                f"input_ids hold {n_image_tokens} image tokens but the images give "
                f"{expected} features"
            )
        vision = prepare_vision(cfg, pixel_values, grid)
    elif n_image_tokens:
        raise ValueError(f"input_ids hold {n_image_tokens} image tokens but no pixel_values")
    positions, next_position = mrope_positions(
        cfg, input_ids, attention_mask, image_grid_thw if vision is not None else None
    )
    return ModelInputs(input_ids, attention_mask, positions, vision), next_position


def branch_layout(
    positions: np.ndarray, branch: np.ndarray, visible: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Attention mask and positions of rows holding a main sequence plus side branches.

    branch: `[batch, seq]` int, 0 for main-sequence tokens, b >= 1 for the tokens of branch b
    (each branch contiguous, after the main sequence). visible: `[batch, seq]`, for a branch
    token the number of leading main tokens its branch continues from. positions: `[3, batch,
    seq]` from `prepare_inputs` on the whole row.

    A main token sees the main tokens up to itself; a branch token sees the first `visible` main
    tokens and its own branch up to itself, and its text position continues from the last
    visible main token, exactly as if the branch were appended to that prefix alone (a branch
    with `visible` 0 is a text-only sequence of its own, positions from 0). Returns
    (mask `[batch, seq, seq]` bool, positions `[3, batch, seq]` int32).
    """
    seq = branch.shape[1]
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    b_i, b_j = branch[:, :, None], branch[:, None, :]
    main_j = b_j == 0
    sees_main = np.where(b_i == 0, j <= i, j < visible[:, :, None])
    mask = (main_j & sees_main) | ((b_i == b_j) & (b_i > 0) & (j <= i))
    positions = np.array(positions, np.int32, copy=True)
    # Branches are contiguous: a token's offset in its branch is its distance to the branch's
    # first token, the latest index where the branch id changed.
    index = np.broadcast_to(np.arange(seq), branch.shape)
    changed = np.concatenate([branch[:, :1] > 0, branch[:, 1:] != branch[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(changed, index, 0), axis=1)
    rows, cols = np.nonzero(branch > 0)
    seen = visible[rows, cols]
    # The last visible main token's position; a branch that sees none starts afresh at 0.
    anchor = np.where(seen > 0, positions[:, rows, seen - 1].max(axis=0), -1)
    positions[:, rows, cols] = anchor[None, :] + 1 + (cols - first[rows, cols])
    return mask, positions
