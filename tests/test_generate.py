"""Generation with the KV cache against transformers' `generate`: greedy decoding must be identical
token for token (single prompt with an image, left-padded batch, early EOS), and the sampling path
must be reproducible from its key."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from hf_reference import (
    TIED,
    UNTIED,
    Prompt,
    hf_generate,
    padded_batch,
    reference,
    single_image_prompt,
)

from dreamr_jax.models.generate import generate
from dreamr_jax.models.hf_io import load_pretrained
from dreamr_jax.models.sampling import Sampling
from dreamr_jax.models.text import attention, attention_upto

NEW_TOKENS = 32


def ours(model, prompt: Prompt, **kwargs) -> np.ndarray:
    return generate(
        model,
        prompt.input_ids,
        prompt.attention_mask,
        prompt.pixel_values,
        prompt.image_grid_thw,
        max_new_tokens=NEW_TOKENS,
        **kwargs,
    )


def assert_same_as_hf(got: np.ndarray, want: np.ndarray, pad_id: int) -> None:
    """`want` may be shorter than `got` (transformers stops once every row has hit EOS); the
    tokens after it must then all be padding."""
    assert got.shape[0] == want.shape[0] and got.shape[1] == NEW_TOKENS
    assert 0 < want.shape[1] <= NEW_TOKENS
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == pad_id).all()


@pytest.fixture(scope="module")
def ref():
    return reference(UNTIED)


@pytest.fixture(scope="module")
def batch(ref):
    return padded_batch(ref.cfg)


@pytest.fixture(scope="module")
def greedy_batch(ref, batch):
    return ours(ref.ours, batch)


@pytest.mark.parametrize("name", [UNTIED, TIED])
def test_greedy_single_image_matches_transformers(name):
    ref = reference(name)
    prompt = single_image_prompt(ref.cfg)
    got = ours(ref.ours, prompt)
    want = hf_generate(ref.hf, ref.cfg, prompt, NEW_TOKENS)
    assert got.dtype == np.int32
    assert_same_as_hf(got, want, ref.cfg.pad_token_id)


def test_greedy_padded_batch_matches_transformers(ref, batch, greedy_batch):
    want = hf_generate(ref.hf, ref.cfg, batch, NEW_TOKENS)
    assert_same_as_hf(greedy_batch, want, ref.cfg.pad_token_id)
    # The rows differ (each row attends only to its own prompt).
    assert (greedy_batch[0] != greedy_batch[1]).any()


def first_new_token(row: list[int], start: int, avoid: list[int]) -> int:
    """The first token of `row` from index `start` on that appeared neither earlier in `row`
    nor anywhere in `avoid`."""
    for i in range(start, len(row)):
        if row[i] not in row[:i] and row[i] not in avoid:
            return row[i]
    return row[start]


def test_greedy_stops_at_eos_like_transformers(ref, batch, greedy_batch):
    """Makes two tokens of the unconstrained greedy output EOS tokens, one that row 0 emits
    early and one that row 1 emits a few steps later: each row must stop at its first EOS and
    pad after it, and transformers then stops early (both rows done) with the same tokens."""
    row0, row1 = greedy_batch[0].tolist(), greedy_batch[1].tolist()
    eos = (first_new_token(row0, 1, row1), first_new_token(row1, 4, row0))
    cfg = dataclasses.replace(ref.cfg, eos_token_ids=eos)
    model = load_pretrained(ref.directory)
    model.config = cfg
    got = ours(model, batch)
    want = hf_generate(ref.hf, ref.cfg, batch, NEW_TOKENS, eos_ids=list(eos))
    assert want.shape[1] < NEW_TOKENS, "transformers should have stopped early"
    assert_same_as_hf(got, want, cfg.pad_token_id)
    for b, row in enumerate((row0, row1)):
        stop = min(row.index(t) for t in eos if t in row)
        assert got[b, : stop + 1].tolist() == row[: stop + 1]
        assert (got[b, stop + 1 :] == cfg.pad_token_id).all()


def test_sampling_is_reproducible_from_the_key(ref, batch, greedy_batch):
    sampling = Sampling(temperature=1.0, top_p=0.95)
    a = ours(ref.ours, batch, sampling=sampling, key=jax.random.key(7))
    b = ours(ref.ours, batch, sampling=sampling, key=jax.random.key(7))
    c = ours(ref.ours, batch, sampling=sampling, key=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(), "a different key should give a different sample"
    assert (a != greedy_batch).any(), "temperature 1 sampling should not be greedy"
    assert ((a >= 0) & (a < ref.cfg.text.vocab_size)).all()


def test_top_k_1_is_greedy(ref, batch, greedy_batch):
    sampling = Sampling(temperature=1.5, top_k=1)
    for seed in (0, 1):
        got = ours(ref.ours, batch, sampling=sampling, key=jax.random.key(seed))
        np.testing.assert_array_equal(got, greedy_batch)


@pytest.mark.parametrize("t", [1, 5])
def test_attention_over_the_cache_layout_equals_a_numpy_reference(t):
    """`attention` reads k/v in the KV cache's layout `[batch, kv_heads, slots, head_dim]` (the
    cache on the matmuls' canonical sides): grouped queries, a decode step (t = 1) and a chunk,
    masked slots in between, against a plain NumPy softmax over the same keys."""
    b, heads, kv_heads, d, slots = 2, 4, 2, 8, 12
    rng = np.random.default_rng(t)
    q = rng.standard_normal((b, t, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, kv_heads, slots, d)).astype(np.float32)
    v = rng.standard_normal((b, kv_heads, slots, d)).astype(np.float32)
    mask = rng.random((b, t, slots)) < 0.7
    mask[..., 0] = True  # every query sees something
    group = heads // kv_heads
    want = np.zeros((b, t, heads, d), np.float32)
    for h in range(heads):
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, h // group]) / np.sqrt(d)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        want[:, :, h] = np.einsum("bts,bsd->btd", probs, v[:, h // group])
    got = np.asarray(attention(q, k, v, mask))
    np.testing.assert_allclose(got, want.reshape(b, t, heads * d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extent", [1, 4, 5, 9, 10])
def test_attention_upto_reads_only_the_blocks_in_use_and_equals_full_attention(extent):
    """`attention_upto` on a stacked cache (10 slots in blocks of 4: branches of 4, 8 and 10
    slots) gives what `attention` over every slot gives, when the slots past `extent` are
    masked, for extents in each block and on a block's edge; and it really ignores those slots
    (garbage in them, NaN included, changes nothing)."""
    layers, b, heads, kv_heads, d, slots, t = 2, 2, 4, 2, 8, 10, 3
    rng = np.random.default_rng(extent)
    q = rng.standard_normal((b, t, heads, d)).astype(np.float32)
    k = rng.standard_normal((layers, b, kv_heads, slots, d)).astype(np.float32)
    v = rng.standard_normal((layers, b, kv_heads, slots, d)).astype(np.float32)
    mask = (rng.random((b, t, slots)) < 0.7) & (np.arange(slots) < extent)
    mask[..., 0] = True
    want = np.asarray(attention(q, k[1], v[1], mask))
    block_of = -(-extent // 4) * 4
    k[:, :, :, block_of:] = np.nan  # unread when extent leaves the last blocks out
    v[:, :, :, block_of:] = np.nan
    got = np.asarray(attention_upto(q, k, v, mask, np.int32(extent), 1, block=4))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
