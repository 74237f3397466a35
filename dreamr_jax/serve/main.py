"""serve.py's job: load the pair, build the engine, answer the input file, print the summary."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
from jax.sharding import Mesh

from dreamr_jax.config import ConfigError
from dreamr_jax.config.schema import DEFAULT_ALPHA, ServeConfig
from dreamr_jax.data import digitmath
from dreamr_jax.parallel.distributed import spread_devices
from dreamr_jax.parallel.mesh import make_mesh
from dreamr_jax.serve.batch import serve
from dreamr_jax.serve.checkpoints import (
    CALIBRATION_FILE,
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    calibrated_alpha,
    load_checkpoint,
)
from dreamr_jax.speculative.engine import Engine


def default_input(cfg: ServeConfig) -> str:
    """The DigitMath test split (seed 0), written next to the output once."""
    folder = os.path.join(os.path.dirname(os.path.abspath(cfg.output)), "digitmath-test")
    path = os.path.join(folder, "test.jsonl")
    problems = digitmath.generate_problems("test", cfg.data.digitmath_problems, 0)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if sum(1 for _ in f) == len(problems):
                return path
    digitmath.write_split(problems, folder, "test")
    return path


def check_paths(cfg: ServeConfig) -> None:
    """Every path key checked before any work, as a `ConfigError` naming the key."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{key}: {message}")

    if cfg.data.input and not os.path.isfile(cfg.data.input):
        what = "a folder, not a JSONL file" if os.path.isdir(cfg.data.input) else "no such file"
        fail("data.input", f"{cfg.data.input} is {what}")
    if os.path.isdir(cfg.output):
        fail("output", f"{cfg.output} is a folder; name a JSONL file")
    folder = os.path.dirname(os.path.abspath(cfg.output))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail("output", f"cannot create its folder {folder}: {e.strerror or e}")
    models = {"target": cfg.target}
    if cfg.spec.mode != "target":
        models["draft"] = cfg.draft
    for key, ref in models.items():
        if ref.path and not os.path.isfile(os.path.join(ref.path, "config.json")):
            what = "has no config.json" if os.path.isdir(ref.path) else "does not exist"
            fail(f"{key}.path", f"{ref.path} is not a checkpoint folder (it {what})")
    cache = os.path.expanduser(cfg.compilation_cache or "")
    if cache and os.path.exists(cache) and not os.path.isdir(cache):
        fail("compilation_cache", f"{cfg.compilation_cache} is a file, not a folder")


def with_pair_alpha(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with `spec.alpha` decided: as given, else the alpha calibrated for this (target,
    draft) pair (`python -m dreamr_jax.calibrate`), else DEFAULT_ALPHA."""
    if cfg.spec.alpha is not None:
        return cfg
    target = cfg.target.path or DEFAULT_TARGET
    draft = cfg.draft.path or DEFAULT_DRAFT
    alpha = calibrated_alpha(target, draft)
    if alpha is None:
        alpha, why = DEFAULT_ALPHA, "the default; this pair has no calibration"
    else:
        why = f"calibrated for this pair: {os.path.join(draft, CALIBRATION_FILE)}"
    if cfg.spec.mode == "dreamr":
        print(f"spec.alpha={alpha} ({why})", file=sys.stderr)
    return dataclasses.replace(cfg, spec=dataclasses.replace(cfg.spec, alpha=alpha))


def submeshes(cfg: ServeConfig) -> tuple[Mesh | None, Mesh | None]:
    """The draft's and the target's meshes (`parallel.*`): disjoint, each tensor-parallel over
    its devices (in a multi-host run, an equal share of every host's where the counts allow);
    (None, None) puts both models on the first device."""
    n_draft, n_target = cfg.parallel.draft_devices, cfg.parallel.target_devices
    if not n_draft:
        return None, None
    if n_draft + n_target > jax.device_count():
        raise ConfigError(
            f"parallel.target_devices: {n_draft} + {n_target} devices asked for, "
            f"{jax.device_count()} present"
        )
    draft_devices, target_devices = spread_devices(n_draft, n_target)
    return make_mesh(1, 1, -1, devices=draft_devices), make_mesh(1, 1, -1, devices=target_devices)


def build_engine(cfg: ServeConfig) -> Engine:
    draft_mesh, target_mesh = submeshes(cfg)
    target = load_checkpoint(
        cfg.target.path or DEFAULT_TARGET,
        cfg.prompt,
        dtype=cfg.target.dtype,
        mesh=target_mesh,
        scan_layers=cfg.target.scan_layers,
    )
    draft = None
    if cfg.spec.mode != "target":
        draft = load_checkpoint(
            cfg.draft.path or DEFAULT_DRAFT,
            cfg.prompt,
            dtype=cfg.draft.dtype,
            mesh=draft_mesh,
            scan_layers=cfg.draft.scan_layers,
        )
    return Engine(target, draft, cfg.spec, seed=cfg.seed)


def format_summary(summary: dict) -> str:
    rows = [(k, v) for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)

    def show(v):
        if isinstance(v, dict | list):
            return json.dumps(v)
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return "\n".join(f"{k.ljust(width)}  {show(v)}" for k, v in rows)


def use_compilation_cache(folder: str | None) -> None:
    """Persists compiled programs in `folder` (JAX's cache), those that took 0.5 s or more to
    compile: the 28 that are most of `python serve.py`'s ~25 s of compilation. Caching every
    program (dozens more, most compiled in milliseconds) made a first run 15 s slower and a
    second only 3 s faster."""
    if not folder:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run(cfg: ServeConfig) -> dict:
    """serve.py's run; raises ConfigError (bad paths), OutputInUseError (another run writes the
    output), MixedSettingsError, or ServeFailure (the process failed; the summary is written)."""
    check_paths(cfg)
    submeshes(cfg)  # more devices than the machine has: a config error before any work
    cfg = with_pair_alpha(cfg)
    use_compilation_cache(cfg.compilation_cache)
    input_path = cfg.data.input or default_input(cfg)
    summary = serve(cfg, input_path, lambda: build_engine(cfg))
    print(format_summary(summary), file=sys.stdout)
    print(f"records: {cfg.output}\nsummary: {cfg.output}.summary.json")
    return summary
