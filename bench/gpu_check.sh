#!/usr/bin/env bash
# The GPU checks the issues name, as one script for the device tool's one lent GPU (prepare on
# the CPU first: PROBLEMS=4 PASSES=1 bash bench/gpu_check.sh). Run from the repository root
# with the machine's own stack (no `pip install -e .`; it has no grain, which serving does not
# need). Writes under $OUT:
#   device.txt       the device, as JAX and nvidia-smi name it
#   pair.json        issue 18: target, exact, dreamr (500 test problems, 3 interleaved passes)
#   batched.json     issue 20: throughput at batch 1 and 8 (target, exact, dreamr)
#   schedules.json   issue 20: the schedules side by side, and sd, on one device
#   trace/           issue 20: a jax.profiler trace of dreamr on 4 problems (TensorBoard)
# One GPU holds both models, so the trace shows the device loop, not two submeshes at work.
set -euo pipefail
OUT=${OUT:-runs/gpu}
PROBLEMS=${PROBLEMS:-500}
PASSES=${PASSES:-3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ python -c "import jax; print(jax.__version__, jax.devices())"; nvidia-smi -L || true; } \
    | tee "$OUT/device.txt"
python bench/target_vs_dreamr.py --problems "$PROBLEMS" --passes "$PASSES" --out "$OUT/pair.json"
python bench/batched.py --problems "$(( PROBLEMS < 200 ? PROBLEMS : 200 ))" --passes "$PASSES" \
    --out "$OUT/batched.json"
python bench/target_vs_dreamr.py --problems "$(( PROBLEMS < 200 ? PROBLEMS : 200 ))" \
    --passes "$PASSES" --out "$OUT/schedules.json" --modes \
    target,dreamr,dreamr:schedule=sequential:fallback=lazy,dreamr:schedule=window:fallback=eager,dreamr:schedule=fpsr:fallback=eager,sd
python - "$OUT/trace" <<'PY'
import sys

import jax

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET, load_checkpoint, pair_alpha
from dreamr_jax.speculative.engine import Engine

target, draft = (load_checkpoint(p, PromptConfig()) for p in (DEFAULT_TARGET, DEFAULT_DRAFT))
engine = Engine(target, draft, SpecConfig(alpha=pair_alpha(DEFAULT_TARGET, DEFAULT_DRAFT)))
problems = digitmath.generate_problems("test", 7, 0)
for p in problems[:3]:
    engine.warm_up(*engine.prompt(p.question, [digitmath.problem_image(p)]))
with jax.profiler.trace(sys.argv[1]):  # 4 problems: ~30 MB of trace on the CPU
    for p in problems[3:]:
        engine.solve(p.question, [digitmath.problem_image(p)])
print("trace:", sys.argv[1])
PY
