"""Train a model: `python train.py --config configs/digitmath/target.yaml [key=value ...]`.

The config's `stage` picks the loop: `sft` (supervised training) or `sapo` (RL of a draft against
a frozen target's judge); both evaluate on the val split and export a Hugging Face checkpoint. A
killed run started again with the same command resumes from its last checkpoint in `output_dir`.
"""

from __future__ import annotations

import argparse
import json
import sys

from dreamr_jax.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (base_config: chains)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from dreamr_jax.parallel.distributed import initialize

    initialize(cfg.distributed)  # before anything touches a device
    if cfg.stage == "sft":
        from dreamr_jax.train.sft import run_sft

        metrics = run_sft(cfg)
    elif cfg.stage == "sapo":
        from dreamr_jax.train.sapo import run_sapo

        metrics = run_sapo(cfg)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
