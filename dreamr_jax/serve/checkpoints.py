"""Loading a model checkpoint folder with everything needed to prompt it.

A checkpoint folder is what `train.py` exports (and what Hugging Face hosts): config.json and
safetensors weights, the tokenizer files, and preprocessor_config.json. The DigitMath pair ships
in the repository under `checkpoints/digitmath/` and is the default of serve-time code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

from dreamr_jax.config.schema import DEFAULT_ALPHA, PromptConfig
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.models.hf_io import load_pretrained
from dreamr_jax.models.processor import make_image_processor

CALIBRATION_FILE = (
    "calibration.json"  # in a draft's folder: the pair's alpha (dreamr_jax.calibrate)
)
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
    path: str | os.PathLike,
    prompt: PromptConfig | None = None,
    *,
    dtype="float32",
    mesh=None,
    scan_layers: bool = False,
) -> LoadedModel:
    """Model (`load_pretrained`), tokenizer, image processor and prompt builder of a checkpoint
    folder."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json)")
    model = load_pretrained(path, dtype=dtype, mesh=mesh, scan_layers=scan_layers)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    else:
        processor = make_image_processor(model.config.vision)
    builder = PromptBuilder.create(tokenizer, model.config, prompt or PromptConfig())
    return LoadedModel(model, tokenizer, processor, builder, path)


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 over a checkpoint folder's safetensors files (names and bytes, in name order):
    which weights a result belongs to."""
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        digest.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def calibrated_alpha(target: str | os.PathLike, draft: str | os.PathLike) -> float | None:
    """The alpha `python -m dreamr_jax.calibrate` stored for this draft with this target, or None
    (no calibration, or one made with other target weights)."""
    path = os.path.join(draft, CALIBRATION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        calibration = json.load(f)
    if calibration.get("target_sha256") != weights_digest(target):
        return None
    return float(calibration["alpha"])


def pair_alpha(target, draft, given: float | None = None) -> float:
    """The alpha to run a pair at: `given`, else the one calibrated for it, else DEFAULT_ALPHA."""
    if given is not None:
        return given
    calibrated = calibrated_alpha(target, draft)
    return DEFAULT_ALPHA if calibrated is None else calibrated
