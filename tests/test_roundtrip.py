"""Checkpoint interop: our `save_pretrained` output loads in transformers and in our loader
(single file and sharded, tied and untied embeddings, bfloat16), and broken checkpoints fail with
errors that name the tensor at fault."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import (
    CONFIGS,
    TIED,
    TOL,
    UNTIED,
    Prompt,
    hf_logits,
    load_hf,
    max_abs,
    our_logits,
    padded_batch,
    reference,
)
from safetensors.numpy import load_file, save_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from dreamr_jax.models.generate import generate
from dreamr_jax.models.hf_io import config_from_hf, config_to_hf, load_pretrained, save_pretrained

SMALL_SHARD = 200_000  # bytes: several shards for every test config


def params(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): np.asarray(var.get_value()) for path, var in flat}


def assert_params_bitwise_equal(a, b) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert pa[key].dtype == pb[key].dtype, key
        assert pa[key].shape == pb[key].shape, key
        assert np.array_equal(pa[key], pb[key]), key


def assert_state_dicts_equal(got: torch.nn.Module, want: torch.nn.Module) -> None:
    sg, sw = got.state_dict(), want.state_dict()
    assert sg.keys() == sw.keys()
    for key in sw:
        assert sg[key].dtype == sw[key].dtype, key
        assert torch.equal(sg[key], sw[key]), key


@pytest.fixture(
    scope="module",
    params=[(UNTIED, None), (TIED, None), (UNTIED, SMALL_SHARD), (TIED, SMALL_SHARD)],
    ids=["untied", "tied", "untied-sharded", "tied-sharded"],
)
def saved(request, tmp_path_factory):
    name, shard = request.param
    ref = reference(name)
    directory = tmp_path_factory.mktemp("saved")
    kwargs = {} if shard is None else {"max_shard_bytes": shard}
    save_pretrained(ref.ours, directory, **kwargs)
    return ref, str(directory), shard


def test_saved_files(saved):
    ref, directory, shard = saved
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "qwen3_vl"
    assert config["tie_word_embeddings"] == ref.cfg.tie_word_embeddings
    keys = set()
    for name in files:
        keys |= set(load_file(os.path.join(directory, name)))
    # The same tensor names as transformers writes (tied checkpoints have no lm_head.weight).
    want_keys = set(load_file(os.path.join(ref.directory, "model.safetensors")))
    assert keys == want_keys
    assert ("lm_head.weight" in keys) != ref.cfg.tie_word_embeddings
    if shard is None:
        assert files == ["model.safetensors"]
        assert not os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    else:
        assert len(files) > 2
        with open(os.path.join(directory, "model.safetensors.index.json")) as f:
            index = json.load(f)
        assert set(index["weight_map"]) == keys
        assert set(index["weight_map"].values()) == set(files)
        for name in files:  # no shard is much over the limit unless it is one big tensor
            tensors = load_file(os.path.join(directory, name))
            assert len(tensors) == 1 or sum(a.nbytes for a in tensors.values()) <= shard


def test_transformers_loads_our_checkpoint(saved):
    ref, directory, _ = saved
    hf, info = Qwen3VLForConditionalGeneration.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    hf.eval()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), f"{kind}: {info[kind]}"
    # Every weight comes back exactly as the reference model had it.
    assert_state_dicts_equal(hf, ref.hf)
    prompt = padded_batch(ref.cfg)
    valid = prompt.attention_mask
    want = hf_logits(hf, ref.cfg, prompt)
    assert max_abs(our_logits(ref.ours, prompt)[valid], want[valid]) < TOL


def test_our_loader_reads_back_bitwise(saved):
    ref, directory, _ = saved
    again = load_pretrained(directory)
    assert again.config == ref.cfg
    assert_params_bitwise_equal(again, ref.ours)


def test_bfloat16_save(tmp_path):
    ref = reference(UNTIED)
    save_pretrained(ref.ours, tmp_path, dtype="bfloat16")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert load_hf_dtype(tmp_path) == torch.bfloat16
    again = load_pretrained(tmp_path, dtype="float32")
    original, loaded = params(ref.ours), params(again)
    for key, value in original.items():
        rounded = value.astype(ml_dtypes.bfloat16).astype(np.float32)
        assert np.array_equal(loaded[key], rounded), key
    as_bf16 = load_pretrained(tmp_path, dtype="bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in params(as_bf16).values())


def load_hf_dtype(directory) -> torch.dtype:
    hf = Qwen3VLForConditionalGeneration.from_pretrained(directory, dtype="auto")
    dtypes = {p.dtype for p in hf.parameters()}
    assert len(dtypes) == 1
    return dtypes.pop()


CONFIG_CASES = {
    **CONFIGS,
    # Token id 0 is a legitimate padding / EOS id and must not read as "unset".
    "pad_and_eos_0": dataclasses.replace(CONFIGS[UNTIED], pad_token_id=0, eos_token_ids=(0,)),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_json_round_trip(name):
    cfg = CONFIG_CASES[name]
    assert config_from_hf(config_to_hf(cfg)) == cfg
    # As transformers writes it back (config.json of a transformers save).
    assert config_from_hf(Qwen3VLConfig(**config_to_hf(cfg)).to_dict()) == cfg


# ------------------------------------------------------------------------------ error cases


@pytest.fixture(scope="module")
def untied():
    return reference(UNTIED)


def broken_copy(ref, tmp_path, edit) -> str:
    """A copy of the reference checkpoint with `edit(tensors)` applied to its tensors."""
    directory = tmp_path / "broken"
    shutil.copytree(ref.directory, directory)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(directory)


def test_reference_checkpoint_loads(untied, tmp_path):
    # The unedited copy loads: the failures below come from the edits alone.
    directory = broken_copy(untied, tmp_path, lambda tensors: None)
    assert_params_bitwise_equal(load_pretrained(directory), untied.ours)
    assert_state_dicts_equal(load_hf(directory), untied.hf)


@pytest.mark.parametrize(
    "key",
    [
        "model.language_model.layers.1.mlp.down_proj.weight",
        "model.language_model.embed_tokens.weight",
        "model.visual.deepstack_merger_list.0.linear_fc2.bias",
        "lm_head.weight",
    ],
)
def test_missing_tensor_is_named(untied, tmp_path, key):
    directory = broken_copy(untied, tmp_path, lambda tensors: tensors.pop(key))
    with pytest.raises((KeyError, ValueError)) as err:
        load_pretrained(directory)
    assert key in str(err.value)


def _reshape(key: str, shape_fn):
    def edit(tensors):
        tensors[key] = np.zeros(shape_fn(tensors[key].shape), tensors[key].dtype)

    return edit


WRONG_SHAPES = {
    # A transposed linear weight (e.g. written in the [in, out] layout).
    "k_proj_transposed": (
        "model.language_model.layers.0.self_attn.k_proj.weight",
        lambda s: s[::-1],
    ),
    "lm_head_vocab": ("lm_head.weight", lambda s: (s[0] - 1, s[1])),
    "norm_length": ("model.language_model.norm.weight", lambda s: (s[0] + 2,)),
    "pos_embed_side": ("model.visual.pos_embed.weight", lambda s: (s[0] * 4, s[1])),
    "merger_rank": ("model.visual.merger.linear_fc1.weight", lambda s: (*s, 1)),
    # A patch size of 14 (Qwen2-VL's) instead of 16.
    "patch_size_14": (
        "model.visual.patch_embed.proj.weight",
        lambda s: (*s[:3], 14, 14),
    ),
    # Another vision width with patch 14: the element count does not split into hidden rows.
    "patch_embed_width": (
        "model.visual.patch_embed.proj.weight",
        lambda s: (s[0] + 1, s[1], s[2], 14, 14),
    ),
}


@pytest.mark.parametrize("case", list(WRONG_SHAPES))
def test_wrong_shape_is_named(untied, tmp_path, case):
    key, shape_fn = WRONG_SHAPES[case]
    directory = broken_copy(untied, tmp_path, _reshape(key, shape_fn))
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        load_pretrained(directory)


def test_unexpected_tensor_is_named(untied, tmp_path):
    key = "model.language_model.layers.7.mlp.up_proj.weight"

    def edit(tensors):
        tensors[key] = np.zeros((4, 4), np.float32)

    directory = broken_copy(untied, tmp_path, edit)
    with pytest.raises(ValueError, match=re.escape(key)):
        load_pretrained(directory)


def test_checkpoint_with_special_ids_outside_its_vocabulary_loads(tmp_path):
    """A small random Qwen3-VL saved by transformers without pad, eos or vision token ids (so
    transformers' and Qwen's defaults apply: 151643, 151645, 151655, ... on a 300-token
    vocabulary). transformers loads and runs it; so do we, with a warning naming each key, and
    generation, which needs eos and pad, refuses with the key."""
    base = CONFIGS["gqa2_hd16_untied"]
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=300))
    hf_dict = config_to_hf(cfg)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        del hf_dict[key]
    for key in ("pad_token_id", "eos_token_id"):
        del hf_dict["text_config"][key]
    torch.manual_seed(0)
    hf_cfg = Qwen3VLConfig(**hf_dict)
    hf_cfg._attn_implementation = "eager"
    Qwen3VLForConditionalGeneration(hf_cfg).eval().save_pretrained(tmp_path)

    with pytest.warns(UserWarning) as caught:
        ours = load_pretrained(tmp_path)
    named = " ".join(str(w.message) for w in caught)
    for key in ("pad_token_id 151643", "eos_token_id 151645", "image_token_id 151655"):
        assert key in named, named
    rng = np.random.default_rng(0)
    prompt = Prompt(rng.integers(0, 300, (1, 9)).astype(np.int32), np.ones((1, 9), bool))
    want = hf_logits(load_hf(str(tmp_path)), ours.config, prompt)
    assert max_abs(our_logits(ours, prompt), want) < TOL
    with pytest.raises(ValueError, match="pad_token_id: 151643 .*eos_token_ids: 151645") as error:
        generate(ours, prompt.input_ids, prompt.attention_mask, max_new_tokens=2)
    assert "image_token_id" not in str(error.value)  # text-only generation does not need it
