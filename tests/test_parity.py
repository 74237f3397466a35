"""Numerical parity with transformers' Qwen3-VL (float32, eager attention) on three tiny random
configurations: vision features (merged tokens and every DeepStack feature) and final logits for
image, multi-image, left-padded and text-only inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import (
    CONFIG_NAMES,
    IMAGE_SIZES,
    PROMPTS,
    TOL,
    hf_image_features,
    hf_logits,
    image_inputs,
    max_abs,
    our_logits,
    reference,
)


@pytest.fixture(scope="module", params=CONFIG_NAMES)
def ref(request):
    return reference(request.param)


def test_image_features_match_transformers(ref):
    """All four images packed together (different sizes and aspect ratios)."""
    pv, grid = image_inputs(ref.cfg, IMAGE_SIZES)
    assert len({tuple(g) for g in grid.tolist()}) == len(IMAGE_SIZES)
    want_merged, want_deepstack = hf_image_features(ref.hf, pv, grid)
    merged, deepstack = ref.ours.get_image_features(pv, grid)

    n_tokens = int(np.prod(grid, axis=-1).sum()) // ref.cfg.vision.spatial_merge_size**2
    assert merged.shape == (n_tokens, ref.cfg.vision.out_hidden_size)
    assert max_abs(merged, want_merged) < TOL
    assert len(want_deepstack) == len(ref.cfg.vision.deepstack_visual_indexes)
    assert deepstack.shape[0] == len(want_deepstack)
    for i, want in enumerate(want_deepstack):
        assert max_abs(deepstack[i], want) < TOL, f"DeepStack feature {i}"
    # The features are not degenerate (the weights were perturbed away from their init).
    assert np.std(want_merged) > 1e-2


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_logits_match_transformers(ref, prompt_name):
    prompt = PROMPTS[prompt_name](ref.cfg)
    want = hf_logits(ref.hf, ref.cfg, prompt)
    got = our_logits(ref.ours, prompt)
    assert got.shape == want.shape == (*prompt.input_ids.shape, ref.cfg.text.vocab_size)
    assert got.dtype == np.float32
    valid = prompt.attention_mask
    assert not valid.all() or prompt.input_ids.shape[0] == 1  # the batches are really padded
    assert max_abs(got[valid], want[valid]) < TOL
    assert np.isfinite(got).all()
    assert np.std(want[valid]) > 1e-2
