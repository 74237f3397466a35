"""Shared helpers for the transformers-parity tests (not a test module).

Three tiny random Qwen3-VL configurations, a builder for the matching transformers reference
model (seeded, weights perturbed so no norm is exactly one and no bias exactly zero), saved once
per process as a Hugging Face checkpoint and loaded with `dreamr_jax.models.hf_io.load_pretrained`,
and input builders: images of several sizes, a prompt with one image, a prompt with two images of
different sizes, a left-padded batch of two prompts, and a text-only prompt.

Everything heavy is cached per process (`reference(name)`), so the parity, generation and
round-trip test modules share the same models, and JAX's jit cache is reused across modules when
the input shapes repeat.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from dreamr_jax.config.schema import ModelConfig, TextConfig, VisionConfig
from dreamr_jax.models.hf_io import config_to_hf, load_pretrained
from dreamr_jax.models.processor import (
    image_placeholder,
    left_pad,
    make_image_processor,
    process_images,
)

TOL = 1e-4

# The reference models are tiny: one torch thread is several times faster than two on a busy
# machine (thread hand-offs dominate) and leaves the other core to XLA.
torch.set_num_threads(1)

# ------------------------------------------------------------------------------------ configs

CONFIGS: dict[str, ModelConfig] = {
    # GQA 4q/2kv, head_dim 16, one DeepStack layer, untied, default token layout.
    "gqa2_hd16_untied": ModelConfig(
        text=TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mrope_section=(4, 2, 2),
        ),
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=(0,),
        ),
        tie_word_embeddings=False,
    ),
    # MQA 4q/1kv, head_dim 8, DeepStack on every vision block, tied embeddings, plain GELU in
    # the ViT, another token layout, a vision head_dim (12) that is not a power of two.
    "mqa_hd8_tied": ModelConfig(
        text=TextConfig(
            vocab_size=448,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            mrope_section=(2, 1, 1),
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-5,
        ),
        vision=VisionConfig(
            depth=2,
            hidden_size=48,
            intermediate_size=96,
            num_heads=4,
            out_hidden_size=48,
            num_position_embeddings=36,
            deepstack_visual_indexes=(0, 1),
            hidden_act="gelu",
        ),
        tie_word_embeddings=True,
        image_token_id=440,
        video_token_id=441,
        vision_start_token_id=437,
        vision_end_token_id=438,
        eos_token_ids=(430, 431),
        pad_token_id=431,
    ),
    # MHA 6q/6kv, head_dim 32, attention biases, 3 decoder layers, DeepStack on the last two of
    # three vision blocks, an M-RoPE split (4, 6, 6) at the edge of what interleaving allows
    # (W's slots run past the 16 frequencies and get clipped, as in transformers).
    "mha_hd32_bias": ModelConfig(
        text=TextConfig(
            vocab_size=576,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=6,
            head_dim=32,
            mrope_section=(4, 6, 6),
            rope_theta=10_000.0,
            attention_bias=True,
        ),
        vision=VisionConfig(
            depth=3,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=(1, 2),
            rope_theta=5_000.0,
        ),
        tie_word_embeddings=False,
        image_token_id=7,
        video_token_id=8,
        vision_start_token_id=5,
        vision_end_token_id=6,
        eos_token_ids=(2,),
        pad_token_id=1,
    ),
}
CONFIG_NAMES = list(CONFIGS)
TIED = "mqa_hd8_tied"
UNTIED = "gqa2_hd16_untied"

for _cfg in CONFIGS.values():
    _cfg.validate()

# Sizes (height, width) before processing; the processor resizes to multiples of 32, giving
# patch grids (2, 4), (4, 4), (4, 2) and (6, 4): 2, 4, 2 and 6 visual tokens after merging.
IMAGE_SIZES = [(32, 48), (64, 64), (72, 40), (96, 48)]


# ------------------------------------------------------------------------ reference models


def build_hf_model(cfg: ModelConfig, seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """A float32, eager-attention transformers Qwen3-VL with random, perturbed weights."""
    torch.manual_seed(seed)
    hf_cfg = Qwen3VLConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "eager"
    model = Qwen3VLForConditionalGeneration(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def save_reference(cfg: ModelConfig, directory: str, seed: int = 0):
    """Builds the reference model of `cfg` and saves it as a checkpoint in `directory`."""
    model = build_hf_model(cfg, seed)
    model.save_pretrained(directory)
    return model


def load_hf(directory: str) -> Qwen3VLForConditionalGeneration:
    """transformers' loader on a checkpoint directory, float32 and eager attention."""
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


@functools.cache
def _tmp_root() -> str:
    # Kept alive for the whole process (the cache holds it); removed at interpreter exit.
    holder = tempfile.TemporaryDirectory(prefix="dreamr_hf_reference_")
    _TMP_HOLDERS.append(holder)
    return holder.name


_TMP_HOLDERS: list = []


def scratch_dir(name: str) -> str:
    path = os.path.join(_tmp_root(), name)
    os.makedirs(path, exist_ok=True)
    return path


@dataclasses.dataclass
class Reference:
    name: str
    cfg: ModelConfig
    directory: str
    hf: Qwen3VLForConditionalGeneration
    ours: object  # dreamr_jax Qwen3VL


@functools.cache
def reference(name: str) -> Reference:
    """The reference model of config `name`, its checkpoint, and our model loaded from it."""
    cfg = CONFIGS[name]
    directory = scratch_dir(f"ref_{name}")
    hf = save_reference(cfg, directory, seed=CONFIG_NAMES.index(name))
    ours = load_pretrained(directory)
    assert ours.config == cfg, "config.json round trip changed the config"
    return Reference(name, cfg, directory, hf, ours)


# ------------------------------------------------------------------------------------ inputs


def make_images(sizes, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@functools.cache
def _processor(vision: VisionConfig):
    return make_image_processor(vision)


def image_inputs(cfg: ModelConfig, sizes, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Packed patches and grids of random images of `sizes`."""
    return process_images(_processor(cfg.vision), make_images(sizes, seed))


def text_ids(cfg: ModelConfig, n: int, seed: int) -> list[int]:
    """`n` random ordinary token ids (no special, EOS or padding id)."""
    special = {
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
        cfg.pad_token_id,
        *cfg.eos_token_ids,
    }
    ordinary = np.array([i for i in range(cfg.text.vocab_size) if i not in special])
    return np.random.default_rng(seed).choice(ordinary, n).tolist()


@dataclasses.dataclass
class Prompt:
    """A batch in the transformers convention (left padded)."""

    input_ids: np.ndarray  # [batch, seq] int32
    attention_mask: np.ndarray  # [batch, seq] bool
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None


def _prompt(cfg: ModelConfig, rows, sizes, seed: int) -> Prompt:
    ids, mask = left_pad(rows, cfg.pad_token_id)
    if not sizes:
        return Prompt(ids, mask)
    pv, grid = image_inputs(cfg, sizes, seed)
    return Prompt(ids, mask, pv, grid)


def _grid(cfg: ModelConfig, size) -> np.ndarray:
    return image_inputs(cfg, [size])[1][0]


def single_image_prompt(cfg: ModelConfig) -> Prompt:
    """Text, one 96x48 image (6x4 patches, 6 visual tokens), text: 17 tokens, 24 patches."""
    size = IMAGE_SIZES[3]
    row = text_ids(cfg, 3, 1) + image_placeholder(cfg, _grid(cfg, size)) + text_ids(cfg, 6, 2)
    return _prompt(cfg, [row], [size], seed=1)


def two_image_prompt(cfg: ModelConfig) -> Prompt:
    """Two images of different sizes and aspect ratios (2x4 and 4x4 patches) between text.

    Same shapes as `single_image_prompt` (17 tokens, 24 patches), so they share one compile.
    """
    a, b = IMAGE_SIZES[0], IMAGE_SIZES[1]
    row = (
        text_ids(cfg, 2, 3)
        + image_placeholder(cfg, _grid(cfg, a))
        + text_ids(cfg, 3, 4)
        + image_placeholder(cfg, _grid(cfg, b))
        + text_ids(cfg, 2, 5)
    )
    return _prompt(cfg, [row], [a, b], seed=2)


def padded_batch(cfg: ModelConfig) -> Prompt:
    """Two prompts of different lengths, left padded: text, a tall image (4x2 patches), text;
    and text, a wide image (2x4 patches), a longer tail."""
    a, b = IMAGE_SIZES[2], IMAGE_SIZES[0]
    row0 = text_ids(cfg, 2, 6) + image_placeholder(cfg, _grid(cfg, a)) + text_ids(cfg, 2, 7)
    row1 = text_ids(cfg, 1, 8) + image_placeholder(cfg, _grid(cfg, b)) + text_ids(cfg, 7, 9)
    return _prompt(cfg, [row0, row1], [a, b], seed=3)


def text_only_batch(cfg: ModelConfig) -> Prompt:
    """Two text-only prompts of different lengths, left padded."""
    return _prompt(cfg, [text_ids(cfg, 5, 11), text_ids(cfg, 9, 12)], [], seed=0)


PROMPTS = {
    "single_image": single_image_prompt,
    "two_images": two_image_prompt,
    "padded_batch": padded_batch,
    "text_only_batch": text_only_batch,
}


# ------------------------------------------------------------------------ reference outputs


def _hf_kwargs(cfg: ModelConfig, prompt: Prompt) -> dict:
    ids = torch.tensor(prompt.input_ids, dtype=torch.long)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.tensor(prompt.attention_mask, dtype=torch.long),
        "mm_token_type_ids": (ids == cfg.image_token_id).long(),
    }
    if prompt.pixel_values is not None:
        kwargs["pixel_values"] = torch.tensor(prompt.pixel_values)
        kwargs["image_grid_thw"] = torch.tensor(prompt.image_grid_thw)
    return kwargs


def hf_logits(model, cfg: ModelConfig, prompt: Prompt) -> np.ndarray:
    """`[batch, seq, vocab]` float32 logits of the transformers model."""
    with torch.no_grad():
        return model(**_hf_kwargs(cfg, prompt)).logits.float().numpy()


def our_logits(model, prompt: Prompt) -> np.ndarray:
    return np.asarray(
        model(prompt.input_ids, prompt.attention_mask, prompt.pixel_values, prompt.image_grid_thw)
    )


def hf_image_features(model, pixel_values, grid) -> tuple[np.ndarray, list[np.ndarray]]:
    """Merged visual tokens `[tokens, hidden]` and each DeepStack feature, all images packed."""
    with torch.no_grad():
        out = model.model.get_image_features(torch.tensor(pixel_values), torch.tensor(grid))
    merged = torch.cat(list(out.pooler_output)).numpy()
    deepstack = [torch.cat(list(f)).numpy() for f in out.deepstack_features]
    return merged, deepstack


def hf_generate(
    model, cfg: ModelConfig, prompt: Prompt, max_new_tokens: int, eos_ids=None
) -> np.ndarray:
    """New tokens `[batch, <= max_new_tokens]` of greedy transformers generation (it stops
    early once every row has produced an EOS; finished rows are filled with the pad id)."""
    eos = list(cfg.eos_token_ids if eos_ids is None else eos_ids)
    with torch.no_grad():
        out = model.generate(
            **_hf_kwargs(cfg, prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=cfg.pad_token_id,
        )
    return out[:, prompt.input_ids.shape[1] :].numpy()


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0
