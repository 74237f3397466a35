"""Hugging Face checkpoint interop: config.json <-> ModelConfig, safetensors <-> NNX state.

Loading builds the model abstractly, then creates every parameter directly with its sharding on
the mesh from memory-mapped checkpoint slices, so no device (and no host buffer) ever holds a
full copy of a sharded weight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dreamr_jax.config.schema import ModelConfig, TextConfig, VisionConfig
from dreamr_jax.models.qwen3vl import Qwen3VL, as_dtype
from dreamr_jax.models.safetensors_io import CheckpointTensors, save_file
from dreamr_jax.parallel.distributed import is_primary, to_host
from dreamr_jax.parallel.rules import variable_sharding

# ----------------------------------------------------------------------------------- config


def _first_set(*values):
    """The first value that is not None (token id 0 is a real id, not "unset")."""
    return next(v for v in values if v is not None)


def config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig from a transformers `Qwen3VLConfig` dict (config.json)."""
    if hf.get("model_type") not in ("qwen3_vl", None):
        raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not qwen3_vl")
    t, v = hf["text_config"], hf["vision_config"]
    # Hub checkpoints use `rope_scaling` + `rope_theta`; transformers 5 writes `rope_parameters`.
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    text = TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 5_000_000.0))),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
        hidden_act=t.get("hidden_act", "silu"),
        attention_bias=t.get("attention_bias", False),
    )
    vrope = v.get("rope_parameters") or {}
    vision = VisionConfig(
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"],
        in_channels=v.get("in_channels", 3),
        patch_size=v.get("patch_size", 16),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        out_hidden_size=v["out_hidden_size"],
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    eos = _first_set(hf.get("eos_token_id"), t.get("eos_token_id"), 151645)
    cfg = ModelConfig(
        text=text,
        vision=vision,
        tie_word_embeddings=bool(
            hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        ),
        image_token_id=hf.get("image_token_id", 151655),
        video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=hf.get("vision_start_token_id", 151652),
        vision_end_token_id=hf.get("vision_end_token_id", 151653),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        pad_token_id=_first_set(hf.get("pad_token_id"), t.get("pad_token_id"), 151643),
    )
    # transformers loads a checkpoint whose special ids lie outside its vocabulary (its defaults
    # on a small one) and runs the forward pass, which reads none of them: so do we, and what
    # needs them checks them (`ModelConfig.require_generation_ids`).
    cfg.validate(strict_token_ids=False)
    return cfg


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The transformers `Qwen3VLConfig` dict of `cfg`."""
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "dtype": dtype,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "attention_bias": t.attention_bias,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
                "mrope_interleaved": True,
            },
            "pad_token_id": cfg.pad_token_id,
            "eos_token_id": list(cfg.eos_token_ids),
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
    }


# ----------------------------------------------------------------------------- weight names


def hf_weight(path: tuple, vision_cfg: VisionConfig) -> tuple[str, Callable, Callable]:
    """The checkpoint key of the parameter at NNX `path`, and the maps (ours -> HF, HF -> ours).

    Linear kernels are stored `[in, out]` here and `[out, in]` in torch; the patch embedding is a
    Conv3d `[hidden, C, T, P, P]` there and a `[C*T*P*P, hidden]` matmul here.
    """
    names = [str(p) for p in path]
    same = lambda a: a  # noqa: E731
    if names[0] == "lm_head":
        return "lm_head.weight", np.transpose, np.transpose
    key = "model." + ".".join(names)
    if names[-2:] == ["patch_embed", "kernel"]:
        v = vision_cfg
        conv = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        return (
            "model.visual.patch_embed.proj.weight",
            lambda a: np.transpose(a).reshape(conv),
            lambda a: np.transpose(a.reshape(conv[0], -1)),
        )
    if names[-2:] == ["patch_embed", "bias"]:
        return "model.visual.patch_embed.proj.bias", same, same
    if names[-1] == "pos_embed":
        return key + ".weight", same, same
    if names[-1] == "kernel":
        return key[: -len("kernel")] + "weight", np.transpose, np.transpose
    return key, same, same


def _flat_params(state: nnx.State):
    return [(path, var) for path, var in nnx.to_flat_state(state) if isinstance(var, nnx.Param)]


def _checkpoint_parts(path: tuple, cfg: ModelConfig) -> tuple[bool, list]:
    """Whether the parameter at NNX `path` is stacked decoder layers (`text.scan_layers`,
    `[layers, ...]`), and `hf_weight` of every checkpoint tensor behind it: one a layer, in
    layer order, if so, else one."""
    if cfg.text.scan_layers and [str(p) for p in path[:2]] == ["language_model", "layers"]:
        layers = range(cfg.text.num_hidden_layers)
        return True, [hf_weight((*path[:2], i, *path[2:]), cfg.vision) for i in layers]
    return False, [hf_weight(path, cfg.vision)]


# ---------------------------------------------------------------------------------- loading


def read_config(path: str) -> ModelConfig:
    """The model config of a checkpoint folder (config.json, with generation_config.json's ids)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    with open(config_path) as f:
        hf = json.load(f)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            gen = json.load(f)
        # The eos ids that end generation live in generation_config.json on the hub.
        for key in ("eos_token_id", "pad_token_id"):
            if gen.get(key) is not None:
                hf[key] = gen[key]
    cfg = config_from_hf(hf)
    for key, problem in cfg.token_id_problems(prefix=""):
        name = key.replace("eos_token_ids", "eos_token_id")  # config.json's key
        use = "generation" if name in ("eos_token_id", "pad_token_id") else "prompts with images"
        warnings.warn(f"{config_path}: {name} {problem}; {use} will refuse it", stacklevel=3)
    return cfg


def abstract_model(cfg: ModelConfig, dtype="float32") -> Qwen3VL:
    return nnx.eval_shape(lambda: Qwen3VL(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype="float32",
    mesh: Mesh | None = None,
    scan_layers: bool = False,
) -> Qwen3VL:
    """Loads a local Hugging Face Qwen3-VL checkpoint directory (config.json + safetensors,
    single or sharded) into a `Qwen3VL` whose parameters are sharded on `mesh` by the logical
    rules (one device if `mesh` is None), its decoder layers stacked for `lax.scan` with
    `scan_layers`. Every tensor's shape is checked against the config."""
    path = os.fspath(path)
    cfg = read_config(path)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, scan_layers=scan_layers))
    dtype = as_dtype(dtype)
    tensors = CheckpointTensors(path)
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    expected_keys = set()
    for p, var in _flat_params(state):
        stacked, parts = _checkpoint_parts(p, cfg)
        shape = var.get_value().shape
        arrays = []
        for key, to_hf, from_hf in parts:
            expected_keys.add(key)
            if key not in tensors:
                raise KeyError(
                    f"{path}: checkpoint has no tensor {key!r} (needed for shape {shape})"
                )
            # Compare in checkpoint layout before converting: a reshape of a wrong-sized tensor
            # would fail inside NumPy with a message that does not name the key.
            want_hf_shape = to_hf(np.empty(shape[1:] if stacked else shape, np.bool_)).shape
            if tensors.shape(key) != want_hf_shape:
                raise ValueError(
                    f"{path}: tensor {key!r} has shape {list(tensors.shape(key))}, the config "
                    f"needs {list(want_hf_shape)}"
                )
            arrays.append(from_hf(tensors.get(key)))
        sharding = (
            variable_sharding(var, mesh)
            if mesh is not None
            # this process's first device: in a multi-host run the first global device is
            # another host's
            else NamedSharding(Mesh(np.array(jax.local_devices()[:1]), ("x",)), PartitionSpec())
        )

        # Each process reads only the slices its own devices hold (the callback runs once per
        # addressable shard), and no copy is made where the checkpoint's dtype is the model's.
        def read(idx, arrays=arrays, stacked=stacked):
            if stacked:  # idx[0] picks layers, the rest slices each layer's tensor
                picked = arrays[idx[0]]
                return np.stack([np.asarray(a[idx[1:]]) for a in picked]).astype(dtype)
            return np.asarray(arrays[0][idx]).astype(dtype, copy=False)

        var.set_value(jax.make_array_from_callback(shape, sharding, read))
        for key, _, _ in parts:
            tensors.release(key)
    unexpected = set(tensors.keys()) - expected_keys
    if cfg.tie_word_embeddings:
        unexpected.discard("lm_head.weight")
    if unexpected:
        raise ValueError(f"{path}: checkpoint tensors not used by the model: {sorted(unexpected)}")
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------- saving


def save_pretrained(
    model: Qwen3VL,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 2 << 30,
) -> None:
    """Writes `model` as a Hugging Face checkpoint directory (config.json, generation_config.json,
    safetensors, sharded with an index when larger than `max_shard_bytes`). In a multi-host
    run every process must call it; process 0 writes."""
    path = os.fspath(path)
    out_dtype = as_dtype(dtype) if dtype is not None else model.dtype
    cfg = model.config
    tensors: dict[str, np.ndarray] = {}
    for p, var in _flat_params(nnx.state(model)):
        stacked, parts = _checkpoint_parts(p, cfg)
        # Every process gathers (a collective), one writes.
        value = to_host(var.get_value().astype(out_dtype))
        for (key, to_hf, _), one in zip(parts, value if stacked else [value], strict=True):
            tensors[key] = np.ascontiguousarray(to_hf(one))
    if not is_primary():
        return
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += tensors[key].nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(a.nbytes for a in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, jnp.dtype(out_dtype).name), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(
            {"eos_token_id": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id}, f, indent=2
        )
