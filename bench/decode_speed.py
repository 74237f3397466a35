"""Greedy decode speed of dreamr_jax's Qwen3-VL against transformers' PyTorch `generate`.

Both sides run the same random checkpoint (a seeded transformers model saved with
`save_pretrained` and loaded by `dreamr_jax.models.hf_io.load_pretrained`), the same prompt (one
image and ~32 text tokens), batch 1, float32, with EOS disabled so each generates exactly
`--new-tokens` tokens. After one warm-up (JIT compilation for ours), repeats alternate ours/HF and
the medians are reported, with the speedup measured inside the same run.

    python bench/decode_speed.py [--new-tokens 128] [--repeats 5] [--configs 20m,2m]
                                 [--out docs/decode_speed.json] [--hf-attn sdpa|eager]
                                 [--torch-threads 0]

"prefill" is the time of a `max_new_tokens=1` generate call (prompt + vision + first token);
"decode tok/s" is `(N - 1) / (t_N - t_1)`, the steady per-token rate after the prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import transformers
from PIL import Image
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from dreamr_jax.config.schema import ModelConfig, TextConfig, VisionConfig
from dreamr_jax.models.generate import generate
from dreamr_jax.models.hf_io import config_to_hf, load_pretrained
from dreamr_jax.models.processor import (
    image_placeholder,
    make_image_processor,
    process_images,
)


def _special_ids(vocab: int) -> dict:
    """Image/video/vision-start/end, EOS and pad ids at the top of a small vocabulary."""
    return dict(
        vision_start_token_id=vocab - 6,
        vision_end_token_id=vocab - 5,
        image_token_id=vocab - 4,
        video_token_id=vocab - 3,
        eos_token_ids=(vocab - 2,),
        pad_token_id=vocab - 1,
    )


def config_20m() -> ModelConfig:
    """~21M parameters: text 384 wide, 6 layers, 6/2 heads of 64; ViT 256 wide, depth 4."""
    return ModelConfig(
        text=TextConfig(
            vocab_size=8192,
            hidden_size=384,
            intermediate_size=896,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=64,
            mrope_section=(16, 8, 8),
        ),
        vision=VisionConfig(
            depth=4,
            hidden_size=256,
            intermediate_size=768,
            num_heads=4,
            out_hidden_size=384,
            num_position_embeddings=256,
            deepstack_visual_indexes=(1,),
        ),
        **_special_ids(8192),
    )


def config_2m() -> ModelConfig:
    """~1.9M parameters: text 128 wide, 4 layers, 4/2 heads of 32; ViT 64 wide, depth 2."""
    return ModelConfig(
        text=TextConfig(
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            mrope_section=(8, 4, 4),
        ),
        vision=VisionConfig(
            depth=2,
            hidden_size=64,
            intermediate_size=256,
            num_heads=2,
            out_hidden_size=128,
            num_position_embeddings=64,
            deepstack_visual_indexes=(0,),
        ),
        **_special_ids(2048),
    )


CONFIGS: dict[str, Callable[[], ModelConfig]] = {"20m": config_20m, "2m": config_2m}


@dataclasses.dataclass
class Prompt:
    """One image and its text, in the transformers convention (batch 1)."""

    input_ids: np.ndarray  # [1, seq] int32
    pixel_values: np.ndarray  # [patches, patch_dim] float32
    image_grid_thw: np.ndarray  # [1, 3] int64


def build_hf_model(cfg: ModelConfig, seed: int) -> Qwen3VLForConditionalGeneration:
    """A seeded random transformers model; weights get extra noise so greedy logits are decisive
    (the default 0.02-std init gives nearly flat logits, where float rounding picks the token)."""
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config_to_hf(cfg))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_prompt(cfg: ModelConfig, seed: int, text_tokens: int = 32, image_side: int = 64) -> Prompt:
    """A random `image_side`^2 RGB image (through the Qwen3-VL image processor) and
    `text_tokens` random ordinary tokens around it."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8))
    pixel_values, grid = process_images(make_image_processor(cfg.vision), [image])
    text = rng.integers(0, cfg.text.vocab_size - 8, text_tokens).tolist()
    ids = text[:4] + image_placeholder(cfg, grid[0]) + text[4:]
    return Prompt(np.asarray([ids], np.int32), pixel_values, grid)


def run_ours(model, prompt: Prompt, new_tokens: int, max_len: int) -> np.ndarray:
    """Greedy tokens `[new_tokens]` from dreamr_jax (the model's config has no EOS ids); a fixed
    `max_len` keeps the KV cache, hence the compiled prefill, the same for every `new_tokens`."""
    out = generate(
        model,
        prompt.input_ids,
        None,
        prompt.pixel_values,
        prompt.image_grid_thw,
        max_new_tokens=new_tokens,
        max_len=max_len,
    )
    return np.asarray(jax.block_until_ready(out))[0]


def run_hf(model, prompt: Prompt, new_tokens: int, pad_id: int) -> np.ndarray:
    """Greedy tokens `[new_tokens]` from transformers' `generate` with EOS disabled."""
    ids = torch.from_numpy(prompt.input_ids.astype(np.int64))
    image_token = model.config.image_token_id
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.from_numpy(prompt.pixel_values),
            image_grid_thw=torch.from_numpy(prompt.image_grid_thw),
            mm_token_type_ids=(ids == image_token).long(),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad_id,
        )
    return out[0, ids.shape[1] :].numpy()


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    """Wall-clock seconds of `fn()` (which returns host arrays) and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_config(name: str, new_tokens: int, repeats: int, seed: int, hf_attn: str) -> dict:
    """Builds the checkpoint, checks both sides agree, and times full and prefill-only runs."""
    cfg = CONFIGS[name]()
    cfg.validate()
    hf = build_hf_model(cfg, seed)
    hf.set_attn_implementation(hf_attn)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_pretrained(tmp, dtype="float32")
    ours.config = dataclasses.replace(ours.config, eos_token_ids=())
    prompt = make_prompt(cfg, seed)
    max_len = prompt.input_ids.shape[1] + new_tokens
    pad = cfg.pad_token_id

    calls = {
        ("ours", "full"): lambda: run_ours(ours, prompt, new_tokens, max_len),
        ("hf", "full"): lambda: run_hf(hf, prompt, new_tokens, pad),
        ("ours", "prefill"): lambda: run_ours(ours, prompt, 1, max_len),
        ("hf", "prefill"): lambda: run_hf(hf, prompt, 1, pad),
    }
    warmup = {key: timed(fn) for key, fn in calls.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    outputs: dict[tuple[str, str], np.ndarray] = {}
    for _ in range(repeats):
        for key, fn in calls.items():  # interleaved ours / HF
            seconds, outputs[key] = timed(fn)
            times[key].append(seconds)

    ours_tokens, hf_tokens = outputs["ours", "full"], outputs["hf", "full"]
    same = ours_tokens.shape == hf_tokens.shape and bool((ours_tokens == hf_tokens).all())
    first_diff = None
    if not same:
        n = min(len(ours_tokens), len(hf_tokens))
        diffs = np.nonzero(ours_tokens[:n] != hf_tokens[:n])[0]
        first_diff = int(diffs[0]) if diffs.size else n
    med = {f"{who}_{what}_s": statistics.median(t) for (who, what), t in times.items()}
    best = {f"{who}_{what}_min_s": min(t) for (who, what), t in times.items()}

    def decode_rate(who: str) -> float:
        return (new_tokens - 1) / max(med[f"{who}_full_s"] - med[f"{who}_prefill_s"], 1e-9)

    return {
        "config": name,
        "params": count_params(hf),
        "vision_params": count_params(hf.model.visual),
        "prompt_tokens": int(prompt.input_ids.shape[1]),
        "new_tokens": new_tokens,
        "ours_generated": int(len(ours_tokens)),
        "hf_generated": int(len(hf_tokens)),
        "outputs_identical": same,
        "first_difference": first_diff,
        "hf_attn_implementation": hf.config._attn_implementation,
        **med,
        **best,
        "speedup_of_minimums": best["hf_full_min_s"] / best["ours_full_min_s"],
        "ours_tok_s": new_tokens / med["ours_full_s"],
        "hf_tok_s": new_tokens / med["hf_full_s"],
        "speedup": med["hf_full_s"] / med["ours_full_s"],
        "ours_decode_tok_s": decode_rate("ours"),
        "hf_decode_tok_s": decode_rate("hf"),
        "decode_speedup": decode_rate("ours") / decode_rate("hf"),
        "prefill_speedup": med["hf_prefill_s"] / med["ours_prefill_s"],
        "warmup_s": {f"{who}_{what}": round(s, 3) for (who, what), (s, _) in warmup.items()},
        "times_s": {f"{who}_{what}": [round(s, 4) for s in t] for (who, what), t in times.items()},
    }


def markdown_table(results: list[dict]) -> str:
    """The summary table: whole-call tok/s, steady decode tok/s and prefill, per config."""
    head = (
        "| config | params | ours tok/s | HF tok/s | speedup | ours decode tok/s "
        "| HF decode tok/s | decode speedup | ours prefill ms | HF prefill ms | identical |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def identical(r: dict) -> str:
        return "yes" if r["outputs_identical"] else f"NO (first diff at {r['first_difference']})"

    rows = [
        f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['ours_tok_s']:.0f} | "
        f"{r['hf_tok_s']:.0f} | {r['speedup']:.2f}x | {r['ours_decode_tok_s']:.0f} | "
        f"{r['hf_decode_tok_s']:.0f} | {r['decode_speedup']:.2f}x | "
        f"{1e3 * r['ours_prefill_s']:.1f} | {1e3 * r['hf_prefill_s']:.1f} | "
        f"{identical(r)} |"
        for r in results
    ]
    return head + "\n".join(rows)


def environment() -> dict:
    """Versions and machine facts recorded alongside the numbers."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "loadavg_1_5_15": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="20m,2m", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/decode_speed.json")
    parser.add_argument(
        "--hf-attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch default)"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")

    transformers.logging.set_verbosity_error()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    results = []
    start_env = environment()
    for name in names:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results.append(bench_config(name, args.new_tokens, args.repeats, args.seed, args.hf_attn))
    print(markdown_table(results))
    for r in results:
        best = r["speedup_of_minimums"]
        print(f"{r['config']}: speedup of best-of-{args.repeats} times {best:.2f}x")
    report = {
        "environment": start_env,
        "loadavg_at_end": os.getloadavg(),
        "args": vars(args),
        "results": results,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
