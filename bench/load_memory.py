"""Peak host memory of `load_pretrained` against the bytes of the weights it keeps (issue 21).

    python bench/load_memory.py --model configs/models/qwen3_vl_2b.yaml --dtype bfloat16 \
        --dir /tmp/qwen3_vl_2b_random --out docs/load_memory.json

Writes a random-weight checkpoint of the model's shapes to `--dir` (sharded, with an index, as
the hub's are; tensor by tensor, so the writer never holds a model), then loads it in a fresh
process on one device and reports that process's peak resident memory (VmHWM) before
and after the load, and the bytes of the loaded parameters. On a CPU the device's arrays live in
host memory, so the weights the host keeps are all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHARD_BYTES = 1 << 30

# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak at fork, and the parent
# here has just written gigabytes of weights.
MEASURE = """
import json, sys
import jax, jax.numpy as jnp
def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
jax.block_until_ready(jnp.zeros(1))  # the runtime is up: its memory is the baseline
before = high_water()
from dreamr_jax.models.hf_io import load_pretrained
from flax import nnx
model = load_pretrained(sys.argv[1], dtype=sys.argv[2])
leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
jax.block_until_ready(leaves)
peak = high_water()
print(json.dumps({"rss_before_load": before, "peak_rss": peak,
                  "weights_bytes": sum(x.nbytes for x in leaves)}))
"""


from target_vs_dreamr import write_record  # noqa: E402

from dreamr_jax.provenance import provenance  # noqa: E402


def write_random_checkpoint(model_yaml: str, dtype: str, folder: str) -> None:
    """Random weights of `model_yaml`'s shapes in HF layout, in shards of ~1 GiB."""
    import ml_dtypes
    from flax import nnx

    from dreamr_jax.models.hf_io import _flat_params, abstract_model, config_to_hf, hf_weight
    from dreamr_jax.models.safetensors_io import save_file
    from dreamr_jax.plan import model_config

    cfg = model_config(model_yaml)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    shard, size, weight_map, names = {}, 0, {}, []

    def flush():
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)

    for path, var in _flat_params(nnx.state(abstract_model(cfg))):
        key, to_hf, _ = hf_weight(path, cfg.vision)
        hf_shape = to_hf(np.empty(var.get_value().shape, np.bool_)).shape
        tensor = (rng.standard_normal(hf_shape, np.float32) * 0.02).astype(np_dtype)
        if shard and size + tensor.nbytes > SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[key], size = tensor, size + tensor.nbytes
    flush()
    total = sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype), f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="configs/models/qwen3_vl_2b.yaml")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dir", default="/tmp/qwen3_vl_2b_random")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        write_random_checkpoint(args.model, args.dtype, args.dir)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, args.dir, args.dtype],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    weights = result["weights_bytes"]
    result.update(
        model=args.model,
        dtype=args.dtype,
        peak_over_weights=round(result["peak_rss"] / weights, 3),
        load_growth_over_weights=round(
            (result["peak_rss"] - result["rss_before_load"]) / weights, 3
        ),
    )
    print(json.dumps(result, indent=2))
    write_record(args.out, {**result, **provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
