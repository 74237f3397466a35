"""Loading a model checkpoint folder with everything needed to prompt it.

A checkpoint folder is what `train.py` exports (and what Hugging Face hosts): config.json and
safetensors weights, the tokenizer files, and preprocessor_config.json. The DigitMath pair ships
in the repository under `checkpoints/digitmath/` and is the default of serve-time code.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

from dreamr_jax.config.schema import PromptConfig
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.models.hf_io import load_pretrained
from dreamr_jax.models.processor import make_image_processor

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARGET = REPO_ROOT / "checkpoints" / "digitmath" / "target"
DEFAULT_DRAFT = REPO_ROOT / "checkpoints" / "digitmath" / "draft"


@dataclasses.dataclass
class LoadedModel:
    model: object  # Qwen3VL
    tokenizer: object
    processor: Qwen2VLImageProcessorPil
    builder: PromptBuilder
    path: str


def load_checkpoint(
    path: str | os.PathLike, prompt: PromptConfig | None = None, *, dtype="float32", mesh=None
) -> LoadedModel:
    """Model, tokenizer, image processor and prompt builder of a checkpoint folder."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json)")
    model = load_pretrained(path, dtype=dtype, mesh=mesh)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    else:
        processor = make_image_processor(model.config.vision)
    builder = PromptBuilder.create(tokenizer, model.config, prompt or PromptConfig())
    return LoadedModel(model, tokenizer, processor, builder, path)
