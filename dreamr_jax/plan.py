"""Memory plan: what a run will hold on each device, worked out without allocating anything.

    python -m dreamr_jax.plan CONFIG.yaml [key=value ...] [--model M.yaml] [--devices N]  # train
    python -m dreamr_jax.plan --serve [key=value ...] [--devices N] [--prompt-tokens P]   # serve

Bytes per device, by part: each model's parameters (their shards under the rule table on the
run's mesh, `parallel/rules.py`), the optimizer state and gradients of the model trained, the
KV caches, and an estimate of the activations. The models are built abstractly (shapes only,
`nnx.eval_shape`) on an abstract mesh of the device count, so a plan for 8 GPUs runs on a
laptop. A model named by a checkpoint folder is read from its config.json; a model YAML
(`configs/models/qwen3_vl_32b.yaml`) stands in for a checkpoint that is not on this machine.

Parameters, optimizer state and serving caches are exact (`tests/test_plan.py` holds them to the
arrays a real run allocates). Activations are estimates: per decoder layer the tensors a
backward pass keeps (about 8 x hidden + 3 x intermediate float32 values a token) and the
attention scores, which this implementation materialises, and the float32 logits.

With `mesh.device_memory_gib` (train) or `parallel.device_memory_gib` (serve) set, a plan that
does not fit exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from dreamr_jax.config import ConfigError, load_config
from dreamr_jax.config.schema import Config, ModelConfig, ServeConfig
from dreamr_jax.models.hf_io import abstract_model, read_config
from dreamr_jax.models.logits import POSITIONS_PER_CHUNK
from dreamr_jax.models.qwen3vl import as_dtype
from dreamr_jax.parallel.mesh import AXES, resolve_axis_sizes
from dreamr_jax.parallel.rules import logical_to_spec
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET

GIB = 2**30
# What `serve.py` loads when no path is given (absolute: the plan may run from any folder)
SHIPPED = {"target": str(DEFAULT_TARGET), "draft": str(DEFAULT_DRAFT)}
# Cache slots past the chain that a verification pass may write (the judge suffixes of a
# window), as `Engine.max_len` adds them; a plan loads no tokenizer to count them.
JUDGE_ROOM = 96


@dataclasses.dataclass
class Part:
    name: str
    bytes: int  # on each device of its group
    exact: bool = True


@dataclasses.dataclass
class Group:
    """Devices that hold the same parts (all of a training mesh; a serving submesh)."""

    title: str
    parts: list[Part]

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)


def abstract_mesh(sizes) -> AbstractMesh:
    return AbstractMesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def model_config(ref: str) -> ModelConfig:
    """A model's architecture: a checkpoint folder's config.json, or a model YAML."""
    if ref.endswith((".yaml", ".yml")):
        return load_config(ref).model
    if not os.path.isfile(os.path.join(ref, "config.json")):
        raise ConfigError(f"{ref}: neither a checkpoint folder (config.json) nor a model YAML")
    return read_config(ref)


def shard_bytes(shape, axes, mesh: AbstractMesh, itemsize: int) -> int:
    """Bytes of one device's shard of an array of `shape` with logical `axes`."""
    spec = tuple(logical_to_spec(axes, shape, mesh))
    spec += (None,) * (len(shape) - len(spec))
    size = 1
    for dim, names in zip(shape, spec, strict=True):
        names = () if names is None else (names,) if isinstance(names, str) else names
        size *= dim // math.prod(mesh.shape[n] for n in names)
    return size * itemsize


def param_bytes(cfg: ModelConfig, dtype: str, mesh: AbstractMesh) -> int:
    """The model's parameters on one device (shards of one array are equal in size here)."""
    state = nnx.state(abstract_model(cfg, dtype), nnx.Param)
    total = 0
    for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = variable.get_value()
        axes = variable.get_metadata().get("axes")
        total += shard_bytes(value.shape, axes, mesh, np.dtype(value.dtype).itemsize)
    return total


def cache_bytes(cfg: ModelConfig, rows: int, max_len: int, dtype: str, mesh=None) -> int:
    """A KV cache (`models/kv_cache.py`) of `rows` x `max_len` slots: whole on every device
    (serving keeps each model's cache replicated on its submesh), or with `mesh` split by the
    rule table's cache axes."""
    t = cfg.text
    shape = (t.num_hidden_layers, rows, t.num_key_value_heads, max_len, t.head_dim)
    axes = (None, "cache_batch", "cache_kv_heads", None, None)
    one = shard_bytes(shape, axes, mesh or abstract_mesh((1, 1, 1)), as_dtype(dtype).itemsize)
    return 2 * one + rows * max_len + 2 * rows * 4  # k, v; the validity mask; two counters


def activation_bytes(
    cfg: ModelConfig, rows: int, seq: int, mesh, backward: bool, remat: bool = False
) -> int:
    """Estimated activations of a forward pass over `rows` x `seq` tokens: with `backward`
    every layer's kept for the backward pass (with `remat` each layer's input only, plus one
    layer's inner activations while it is recomputed), else one layer's at a time; and the
    float32 logits of one chunk of positions (`models/logits.py`; twice for a backward pass)."""
    t = cfg.text
    rows_here = math.ceil(rows / (mesh.shape["data"] * mesh.shape["fsdp"]))
    tokens = rows_here * seq
    per_layer = tokens * (8 * t.hidden_size + 3 * t.intermediate_size) * 4
    scores = tokens * seq * t.num_attention_heads * 4 // mesh.shape["tensor"]
    if backward and remat:
        kept = t.num_hidden_layers * tokens * t.hidden_size * 4 + per_layer + scores
    else:
        kept = (t.num_hidden_layers if backward else 1) * (per_layer + scores)
    positions = rows_here * min(seq, POSITIONS_PER_CHUNK)
    logits = positions * t.vocab_size * 4 * (2 if backward else 1) // mesh.shape["tensor"]
    return kept + logits


def train_plan(cfg: Config, devices: int) -> list[Group]:
    """train.py's run: the trained model with AdamW and its gradients, and for stage sapo the
    reference draft, the frozen target and the rollouts, all on the one mesh."""
    sizes = resolve_axis_sizes((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)
    mesh = abstract_mesh(sizes)
    params = param_bytes(cfg.model, cfg.dtype, mesh)
    # AdamW's two moments and the gradients are kept in the parameters' dtype.
    parts = [
        Part("parameters", params),
        Part("optimizer state (AdamW mu, nu)", 2 * params),
        Part("gradients", params),
    ]
    if cfg.stage == "sapo":
        s = cfg.sapo
        rows, seq = s.prompts * s.group_size, cfg.data.seq_len + s.max_new_tokens
        target = model_config(s.target)
        if s.micro_batches > 1:
            parts.append(Part("gradient accumulator (micro-batches)", params))
        parts += [
            Part("reference draft (KL)", params),
            Part("target parameters (frozen judge)", param_bytes(target, cfg.dtype, mesh)),
            Part("rollout KV cache", cache_bytes(cfg.model, rows, seq, cfg.dtype, mesh), False),
            Part(
                "activations of the update",
                activation_bytes(cfg.model, rows // s.micro_batches, seq, mesh, True, s.remat),
                False,
            ),
            Part(
                "activations of the scoring pass",
                activation_bytes(target, rows, seq, mesh, False),
                False,
            ),
        ]
    else:
        batch, seq = cfg.train.batch_size, cfg.data.seq_len
        parts.append(
            Part("activations", activation_bytes(cfg.model, batch, seq, mesh, True), False)
        )
    title = f"each of {devices} devices, mesh (data, fsdp, tensor) = {tuple(sizes)}"
    return [Group(title, parts)]


def serve_plan(cfg: ServeConfig, devices: int, prompt_tokens: int) -> list[Group]:
    """serve.py's run: with `parallel.*` the draft on its devices and the target on the next
    ones, each tensor-parallel with its cache replicated; else both on the first device."""
    p, s = cfg.parallel, cfg.spec
    apart = p.draft_devices > 0
    if apart and p.draft_devices + p.target_devices > devices:
        raise ConfigError(
            f"parallel.target_devices: {p.draft_devices} + {p.target_devices} devices asked "
            f"for, {devices} present"
        )
    bucket = -(-prompt_tokens // 16) * 16
    max_len = -(-(bucket + s.max_new_tokens + s.max_step_tokens + JUDGE_ROOM) // 128) * 128
    width = (s.window + 1) * s.max_step_tokens + JUDGE_ROOM  # tokens of a verification pass
    rows = cfg.batch_size

    def model_parts(role: str, ref, n_devices: int, forward_width: int) -> list[Part]:
        model = model_config(ref.path or SHIPPED[role])
        mesh = abstract_mesh((1, 1, n_devices))
        return [
            Part(f"{role} parameters", param_bytes(model, ref.dtype, mesh)),
            Part(f"{role} KV cache", cache_bytes(model, rows, max_len, ref.dtype)),
            Part(
                f"{role} activations",
                activation_bytes(model, rows, forward_width, mesh, False),
                False,
            ),
        ]

    target = model_parts("target", cfg.target, p.target_devices or 1, width)
    if s.mode == "target":
        return [Group("the target's device", target)]
    draft = model_parts("draft", cfg.draft, p.draft_devices or 1, 1)
    if not apart:
        return [Group("the one device of both models", target + draft)]
    return [
        Group(f"each of the target's {p.target_devices} devices", target),
        Group(f"each of the draft's {p.draft_devices} devices", draft),
    ]


def render(groups: list[Group], budget_gib: float) -> tuple[str, bool]:
    """The plan as text, and whether every group fits `budget_gib` (0: not checked)."""
    lines, fits = [], True
    for group in groups:
        lines.append(f"{group.title}:")
        for p in group.parts:
            note = "" if p.exact else "  (estimate)"
            lines.append(f"  {p.name:40s} {p.bytes / GIB:10.3f} GiB{note}")
        lines.append(f"  {'total':40s} {group.total / GIB:10.3f} GiB")
        if budget_gib:
            ok = group.total <= budget_gib * GIB
            fits &= ok
            verdict = "fits in" if ok else "does NOT fit in"
            lines.append(f"  {verdict} {budget_gib:g} GiB a device")
    return "\n".join(lines), fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dreamr_jax.plan", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("config", nargs="?", help="train.py's YAML config (not with --serve)")
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    parser.add_argument("--serve", action="store_true", help="plan serve.py's run")
    parser.add_argument(
        "--model", help="train: a model YAML whose architecture replaces the config's model"
    )
    parser.add_argument("--devices", type=int, default=None, help="default: this machine's")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="serving: prompt size")
    args = parser.parse_intermixed_args(argv)  # key=value and --options in any order
    devices = args.devices or jax.device_count()
    try:
        if args.serve:
            overrides = [a for a in (args.config, *args.overrides) if a is not None]
            cfg = load_config(None, overrides, cls=ServeConfig)
            groups = serve_plan(cfg, devices, args.prompt_tokens)
            budget = cfg.parallel.device_memory_gib
        else:
            if args.config is None:
                parser.error("name train.py's config, or plan serving with --serve")
            cfg = load_config(args.config, args.overrides)
            if args.model:  # e.g. SAPO's config with a Qwen3-VL-4B draft in place of DigitMath's
                cfg = dataclasses.replace(cfg, model=model_config(args.model))
            groups, budget = train_plan(cfg, devices), cfg.mesh.device_memory_gib
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    text, fits = render(groups, budget)
    print(text)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
