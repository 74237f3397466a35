"""Qwen3-VL in Flax NNX: modules, KV cache, generation, Hugging Face interop."""

from dreamr_jax.models.generate import decode_loop, decode_step, generate, prefill
from dreamr_jax.models.hf_io import config_from_hf, config_to_hf, load_pretrained, save_pretrained
from dreamr_jax.models.init import init_model
from dreamr_jax.models.inputs import ModelInputs, VisionInputs, prepare_inputs
from dreamr_jax.models.kv_cache import KVCache, init_cache, rollback
from dreamr_jax.models.qwen3vl import Qwen3VL
from dreamr_jax.models.sampling import GREEDY, Sampling

__all__ = [
    "GREEDY",
    "KVCache",
    "ModelInputs",
    "Qwen3VL",
    "Sampling",
    "VisionInputs",
    "config_from_hf",
    "config_to_hf",
    "decode_loop",
    "decode_step",
    "generate",
    "init_cache",
    "init_model",
    "load_pretrained",
    "prefill",
    "prepare_inputs",
    "rollback",
    "save_pretrained",
]
