"""Data: the embedded DigitMath task and its tokenizer.

Names are loaded lazily (PEP 562) so `python -m dreamr_jax.data.digitmath` does not import the
module twice (runpy warns when a package's __init__ has already imported the module it runs).
"""

import importlib

_EXPORTS = {
    "CORRUPTION_KINDS": "digitmath",
    "FAMILIES": "digitmath",
    "SPLITS": "digitmath",
    "STEP_DELIMITER": "digitmath",
    "Problem": "digitmath",
    "corrupt_step": "digitmath",
    "extract_answer": "digitmath",
    "generate_problems": "digitmath",
    "is_correct": "digitmath",
    "render_image": "digitmath",
    "scan_pools": "digitmath",
    "write_split": "digitmath",
    "SPECIAL_TOKEN_IDS": "tokenizer",
    "build_default_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
