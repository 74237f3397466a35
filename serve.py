"""Batch inference: `python serve.py [CONFIG.yaml] [key=value ...]`.

With no arguments it answers the DigitMath test split with the shipped target/draft pair in mode
`dreamr` and prints a summary. Keys: `spec.mode`
(target|draft|sd|specreason|lookahead|exact|dreamr), `spec.alpha`, `spec.window`,
`spec.fallback`, `target.path`, `draft.path`, `data.input` (JSONL), `data.limit`, `output`
(JSONL), `seed`, ... (see `dreamr_jax/config/schema.py`, ServeConfig).
Rerunning with the same `output` skips the ids already answered. A bad record gets an `error`
line and the batch goes on; exit 2 for a config error, an output another run is writing, or one
made with other settings; exit 1 when the process itself fails (out of memory, a broken model).
"""

from __future__ import annotations

import sys

from dreamr_jax.config import ConfigError, load_config
from dreamr_jax.config.schema import ServeConfig


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    path = args.pop(0) if args and "=" not in args[0] else None
    try:
        cfg = load_config(path, args, cls=ServeConfig)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from dreamr_jax.serve.batch import ServeFailure
    from dreamr_jax.serve.main import run
    from dreamr_jax.serve.output import MixedSettingsError, OutputInUseError

    try:
        run(cfg)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except (OutputInUseError, MixedSettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ServeFailure as error:
        print(
            f"error: the run stopped: {error}\nWhat it answered is in {cfg.output}; run the same "
            "command again to go on.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
