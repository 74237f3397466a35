"""dreamr_jax: DREAM-R step-level speculative reasoning for vision-language models in JAX.

Public entry points:
    load_pretrained(path, *, dtype="float32", mesh=None) -> Qwen3VL
    save_pretrained(model, path)
"""

from dreamr_jax.models.hf_io import load_pretrained, save_pretrained
from dreamr_jax.models.qwen3vl import Qwen3VL

__all__ = ["Qwen3VL", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
