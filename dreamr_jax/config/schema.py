"""Frozen dataclasses describing every configurable piece of dreamr_jax.

The loader (`dreamr_jax.config.loader`) builds these from YAML files and `key=value` overrides,
checking types and names; each dataclass checks its own invariants in `validate()`, which raises
`ValueError` with the dotted key at fault (the loader prefixes the file name).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

DTYPE_NAMES = ("float32", "bfloat16", "float16")

# Upper bounds of the values that size memory (see `_check_size`): generous for real models
# (Qwen3-VL's context is 262,144 positions), far below what exhausts a host.
MAX_TOKENS = 262_144  # tokens in a sequence, a chain or one pass
MAX_STEP_TOKENS = 8_192  # tokens in one reasoning step or proposal
MAX_STEPS_PER_PASS = 64  # steps one verification pass holds (W; judge branches)
MAX_BATCH = 65_536  # rows of a batch
MAX_PATCHES = 1 << 20  # image patches of one example
MAX_IMAGE_PIXELS = 1 << 30  # pixels of one image (PIL refuses past 2 * 89,478,485 anyway)
MAX_IMAGES = 256  # images of one record
MAX_WARMUP = 100  # problems solved before serving
WORDING_MIXES = ("canonical", "target", "draft", "uniform")  # dreamr_jax.data.wordings.MIXES
CORRUPTION_KINDS = ("misread", "arithmetic_slip", "skipped_step", "repeated_step")  # digitmath's


def _fail(key: str, message: str) -> None:
    raise ValueError(f"{key}: {message}")


def _check_size(key: str, value: int, most: int, what: str) -> None:
    """A value that sizes memory: positive and at most `most`, checked before anything is
    allocated (an unbounded value passes every other check and then asks the allocator for
    terabytes)."""
    if not 1 <= value <= most:
        _fail(key, f"must be in [1, {most:,}] ({what}), got {value:,}")


def _check_dtype(key: str, dtype: str) -> None:
    if dtype not in DTYPE_NAMES:
        _fail(key, f"unsupported dtype {dtype!r}; expected one of {DTYPE_NAMES}")


@dataclass(frozen=True)
class VisionConfig:
    """The ViT of Qwen3-VL (`Qwen3VLVisionConfig` in transformers)."""

    depth: int = 2  # ViT blocks
    hidden_size: int = 64  # width of the ViT's residual stream
    intermediate_size: int = 128  # width of the hidden layer of each ViT block's MLP
    # attention heads per ViT block: must divide hidden_size, and head_dim (hidden_size /
    # num_heads) must be a multiple of 4 (2D rotary splits it between rows and columns)
    num_heads: int = 4
    in_channels: int = 3  # colour channels of an image (3: RGB)
    patch_size: int = 16  # side of a square patch, in pixels
    temporal_patch_size: int = 2  # frames in one patch (a still image is repeated to fill them)
    spatial_merge_size: int = 2  # side of the block of patches merged into one visual token
    out_hidden_size: int = 64  # width of a merged visual token; must equal text.hidden_size
    # learned position embeddings: a square grid (64 = 8 x 8), interpolated to each image's grid
    num_position_embeddings: int = 64
    # ViT blocks (each < depth) whose merged features are added, in order, to the image tokens'
    # hidden states after the first decoder layers (DeepStack); at most num_hidden_layers of them
    deepstack_visual_indexes: tuple[int, ...] = (0,)
    hidden_act: str = "gelu_pytorch_tanh"  # MLP activation: "gelu_pytorch_tanh" or "gelu" (exact)
    rope_theta: float = 10000.0  # base of the 2D rotary frequencies (patch row and column)
    layer_norm_eps: float = 1e-6  # epsilon of the ViT blocks' LayerNorms

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels * temporal * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def validate(self, prefix: str = "vision") -> None:
        for name in (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "out_hidden_size",
            "num_position_embeddings",
            "in_channels",
        ):
            if getattr(self, name) <= 0:
                _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            _fail(
                f"{prefix}.num_heads",
                f"{self.num_heads} heads do not divide hidden_size {self.hidden_size}",
            )
        if self.head_dim % 4:
            _fail(
                f"{prefix}.num_heads",
                f"vision head_dim {self.head_dim} must be a multiple of 4 "
                "(2D rotary splits it between rows and columns)",
            )
        side = round(self.num_position_embeddings**0.5)
        if side * side != self.num_position_embeddings:
            _fail(
                f"{prefix}.num_position_embeddings",
                f"{self.num_position_embeddings} is not a square number",
            )
        for i in self.deepstack_visual_indexes:
            if not 0 <= i < self.depth:
                _fail(
                    f"{prefix}.deepstack_visual_indexes",
                    f"layer {i} is outside the {self.depth} vision blocks",
                )
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            _fail(f"{prefix}.hidden_act", f"unsupported activation {self.hidden_act!r}")


@dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder of Qwen3-VL (`Qwen3VLTextConfig` in transformers)."""

    vocab_size: int = 512  # tokens in the vocabulary (embedding rows, logits per position)
    hidden_size: int = 64  # width of the decoder's residual stream
    intermediate_size: int = 128  # width of the hidden layer of each decoder MLP (SwiGLU)
    num_hidden_layers: int = 2  # decoder layers
    num_attention_heads: int = 4  # query heads per attention layer
    # key/value heads (grouped-query attention): must divide num_attention_heads
    num_key_value_heads: int = 2
    head_dim: int = 16  # width of one attention head (even: rotary embeddings)
    rms_norm_eps: float = 1e-6  # epsilon of the decoder's RMSNorms
    rope_theta: float = 5_000_000.0  # base of the rotary frequencies
    # Interleaved M-RoPE: rotary frequencies for (temporal, height, width) positions, 3 values
    # summing to head_dim / 2
    mrope_section: tuple[int, ...] = (4, 2, 2)
    # most positions of a sequence: serving refuses a prompt + spec.max_new_tokens past it
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"  # MLP activation; only "silu"
    attention_bias: bool = False  # biases on the attention's q/k/v/o projections
    # The decoder layers as one stacked block run by `lax.scan` (compile time flat in depth;
    # checkpoints keep one tensor a layer), or a Python loop over layers (default: the
    # fastest on small models). Not part of the architecture: no Hugging Face config holds it.
    scan_layers: bool = False

    def validate(self, prefix: str = "text") -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail(
                f"{prefix}.num_key_value_heads",
                f"{self.num_key_value_heads} KV heads do not divide "
                f"{self.num_attention_heads} attention heads",
            )
        if self.head_dim % 2:
            _fail(f"{prefix}.head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            _fail(
                f"{prefix}.mrope_section",
                f"{list(self.mrope_section)} must be 3 sections summing to head_dim/2 = "
                f"{self.head_dim // 2}",
            )
        # Interleaved M-RoPE gives H and W every third frequency: each needs 3*section slots.
        if 3 * max(self.mrope_section[1:]) > self.head_dim // 2 + 2:
            _fail(
                f"{prefix}.mrope_section",
                f"{list(self.mrope_section)} does not fit interleaved over "
                f"{self.head_dim // 2} frequencies",
            )
        if self.hidden_act != "silu":
            _fail(f"{prefix}.hidden_act", f"unsupported activation {self.hidden_act!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole Qwen3-VL dense model (`Qwen3VLConfig` in transformers)."""

    text: TextConfig = field(default_factory=TextConfig)  # the decoder
    vision: VisionConfig = field(default_factory=VisionConfig)  # the vision tower (ViT)
    tie_word_embeddings: bool = False  # the output projection reuses the token embeddings
    # Special-token ids, each inside the vocabulary. Defaults fit the default 512-token vocabulary
    # (Qwen's layout shifted down); real presets set Qwen's ids (image 151655, video 151656,
    # vision start/end 151652/151653, eos 151645/151643)
    image_token_id: int = 508  # <|image_pad|>: one per merged patch, replaced by its features
    video_token_id: int = 509  # <|video_pad|>: kept in the HF config; nothing here reads video
    vision_start_token_id: int = 505  # <|vision_start|>: opens an image's placeholder
    vision_end_token_id: int = 506  # <|vision_end|>: closes an image's placeholder
    # end-of-sequence ids: generation stops at any of them; the first ends a chain's final step
    eos_token_ids: tuple[int, ...] = (498, 496)
    pad_token_id: int = 496  # fills the padding of prompts and training examples

    def validate(self, prefix: str = "model", *, strict_token_ids: bool = True) -> None:
        """Raises on the first invalid field. `strict_token_ids=False` (a checkpoint being
        loaded) leaves special-token ids outside the vocabulary to `token_id_problems`."""
        self.text.validate(f"{prefix}.text")
        self.vision.validate(f"{prefix}.vision")
        if self.vision.out_hidden_size != self.text.hidden_size:
            _fail(
                f"{prefix}.vision.out_hidden_size",
                f"{self.vision.out_hidden_size} must equal text.hidden_size "
                f"{self.text.hidden_size} (vision features replace token embeddings)",
            )
        if len(self.vision.deepstack_visual_indexes) > self.text.num_hidden_layers:
            _fail(
                f"{prefix}.vision.deepstack_visual_indexes",
                "more DeepStack features than decoder layers to receive them",
            )
        if strict_token_ids:
            for key, problem in self.token_id_problems(prefix):
                _fail(key, problem)

    def token_id_problems(self, prefix: str = "model") -> list[tuple[str, str]]:
        """(key, problem) for each special-token id outside the vocabulary (keys under `prefix`,
        bare names without one). A checkpoint may hold such ids (transformers' defaults on a small
        vocabulary) and still run: the forward pass reads none of them; generation needs eos and
        pad (`require_generation_ids`), prompts with images need image_token_id."""
        named = [
            (name, getattr(self, name))
            for name in (
                "image_token_id",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
                "pad_token_id",
            )
        ] + [("eos_token_ids", value) for value in self.eos_token_ids]
        vocab = self.text.vocab_size
        return [
            (
                f"{prefix}.{name}" if prefix else name,
                f"{value} is outside the vocabulary (vocab_size {vocab})",
            )
            for name, value in named
            if not 0 <= value < vocab
        ]

    def require_generation_ids(self, prefix: str = "model") -> None:
        """Raises where generation cannot run: it stops at an eos id and pads with pad_token_id,
        so both must be tokens of the vocabulary."""
        needed = [
            f"{key}: {problem}"
            for key, problem in self.token_id_problems(prefix)
            if key.rsplit(".", 1)[-1] in ("eos_token_ids", "pad_token_id")
        ]
        if needed:
            raise ValueError(
                "; ".join(needed) + ": generation needs them (set them in the checkpoint's config)"
            )


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes of the (data, fsdp, tensor) axes; -1 takes the remaining devices."""

    data: int = 1  # devices that split the batch, weights replicated; -1: the rest
    fsdp: int = -1  # devices that split the batch and the weights (FSDP); -1: the rest
    tensor: int = 1  # devices that split heads, MLP and vocabulary (tensor parallel); -1: the rest
    # GiB of memory each device has, which `python -m dreamr_jax.plan` checks the run's plan
    # against (0: not checked)
    device_memory_gib: float = 0.0

    def validate(self, prefix: str = "mesh") -> None:
        if self.device_memory_gib < 0:
            _fail(f"{prefix}.device_memory_gib", f"must be >= 0, got {self.device_memory_gib}")
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            _fail(prefix, "at most one axis may be -1")
        for name, s in zip(("data", "fsdp", "tensor"), sizes, strict=True):
            if s == 0 or s < -1:
                _fail(f"{prefix}.{name}", f"must be positive or -1, got {s}")


@dataclass(frozen=True)
class DistributedConfig:
    """Several hosts, one process each, joined by `jax.distributed` before any device is used.
    Unset fields are found by JAX (TPU pods, SLURM, Open MPI, `JAX_COORDINATOR_ADDRESS`)."""

    initialize: bool = False  # join the processes of a multi-host run (false: one process)
    coordinator_address: str = ""  # host:port of process 0 ("" = found by JAX)
    num_processes: int = 0  # processes in the run (0 = found by JAX)
    process_id: int = -1  # this process's index, 0 .. num_processes - 1 (-1 = found by JAX)
    timeout_s: int = 300  # seconds to wait for every process to join

    def validate(self, prefix: str = "distributed") -> None:
        if self.num_processes < 0:
            _fail(f"{prefix}.num_processes", f"must be >= 0, got {self.num_processes}")
        if self.process_id < -1 or (self.num_processes and self.process_id >= self.num_processes):
            _fail(
                f"{prefix}.process_id",
                f"must be -1 or in [0, num_processes), got {self.process_id}",
            )
        if self.timeout_s <= 0:
            _fail(f"{prefix}.timeout_s", f"must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and checkpointing of a training run."""

    steps: int = 1000  # optimiser steps of the run (also the length of the cosine decay)
    # examples per step, 1-65,536 (stage sft; a sapo update has sapo.prompts * group_size rows)
    batch_size: int = 16
    learning_rate: float = 1e-3  # peak learning rate of AdamW, reached after the warm-up
    warmup_steps: int = 50  # steps of linear warm-up from 0 to the peak, in [0, steps)
    end_learning_rate_ratio: float = 0.1  # cosine decay ends at this fraction of the peak
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    b1: float = 0.9  # AdamW's decay of the first moment (beta1)
    b2: float = 0.95  # AdamW's decay of the second moment (beta2)
    grad_clip: float = 1.0  # gradients are clipped to this global norm
    save_every: int = 200  # steps between checkpoints in <output_dir>/checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    # steps between metrics records (<output_dir>/metrics: TensorBoard and metrics.jsonl)
    log_every: int = 10
    # A checkpoint folder (HF layout) whose weights start the run instead of a random init:
    # fine-tuning. Its model config must equal `model`. "" = from scratch.
    init_from: str = ""

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
        _check_size(f"{prefix}.batch_size", self.batch_size, MAX_BATCH, "examples in a step")
        if self.learning_rate <= 0:
            _fail(f"{prefix}.learning_rate", f"must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_steps < self.steps:
            _fail(
                f"{prefix}.warmup_steps",
                f"must be in [0, steps={self.steps}), got {self.warmup_steps}",
            )
        if not 0 <= self.end_learning_rate_ratio <= 1:
            _fail(f"{prefix}.end_learning_rate_ratio", "must be in [0, 1]")


@dataclass(frozen=True)
class PromptConfig:
    """How (images, question, steps so far) become a chat, and how the target judges a step.

    A judge query is the reasoning context, the candidate step with its terminator (the
    delimiter, or EOS for a final step), then `judge_suffix`; the next token decides. CPN sums
    the probabilities of `positive_words` and of `negative_words`, each of which must be a single
    token of the model's tokenizer (checked when the prompt builder is made).
    """

    system: str = ""  # an optional system message
    enable_thinking: bool = False  # open a <think> block after the assistant header
    step_delimiter: str = "\n\n"  # ends every step but the final one (EOS ends that); not empty
    judge_suffix: str = "Step correct? Answer:"  # asks the judge about the step before it
    # single tokens meaning "correct": CPN sums their probabilities; a trained judge says the first
    positive_words: tuple[str, ...] = (" Yes",)
    # single tokens meaning "wrong" (none also positive); a trained judge says the first
    negative_words: tuple[str, ...] = (" No",)
    # SpecReason's judge: the target rates the step 0-9 with one token; kept if >= the threshold.
    score_suffix: str = "Score 0 to 9: "

    def validate(self, prefix: str = "prompt") -> None:
        if not self.step_delimiter:
            _fail(f"{prefix}.step_delimiter", "must not be empty")
        if not self.positive_words or not self.negative_words:
            _fail(prefix, "positive_words and negative_words must both be non-empty")
        if set(self.positive_words) & set(self.negative_words):
            _fail(prefix, "a word cannot be both positive and negative")


@dataclass(frozen=True)
class DataConfig:
    """The training/evaluation data of a run."""

    dataset: str = "digitmath"  # the dataset; "digitmath" is the only one
    # The words the chains' steps are written in (a mix of dreamr_jax.data.wordings.MIXES):
    # "canonical" (one wording per step kind, the first pair's), "target", "draft", "uniform"
    wording: str = "canonical"
    train_problems: int = 20000  # problems of the train split trained on (the first this many)
    val_problems: int = 200  # >= 0; read by no code (evaluation takes `eval.problems` of them)
    data_seed: int = 0  # seed of the generated problems (the run's `seed` shuffles and inits)
    judge_fraction: float = 0.0  # share of SFT examples that teach step judging (the target's)
    score_fraction: float = 0.25  # share of judge examples in SpecReason's 0-9 score format
    drill_fraction: float = 0.0  # share of text-only arithmetic drills (the chains' operations)
    # share of a drill's facts that are count_greater fragments (a reading step, then its count)
    count_drill_fraction: float = 0.0
    judge_loss_weight: float = 1.0  # loss weight of a judge verdict token (a chain token: 1)
    read_loss_weight: float = 1.0  # loss weight of the tokens of the chains' reading steps
    # odds of a content error (misread, arithmetic slip) among a training candidate's corruptions,
    # against a structural one (skipped, repeated); evaluation always draws uniformly
    content_error_weight: float = 1.0
    # Judge queries packed as tree branches after each chain (several verdicts per example)
    judge_branches: int = 0
    # Fill the room a reasoning example leaves in its row with drill facts, as one more branch
    # that sees only itself (the rows then carry the tree layout)
    pack_drills: bool = False
    # Judge negatives from a draft checkpoint folder: its greedy chain on each of the first
    # `draft_mistake_problems` train problems, where it first leaves the gold chain, is the
    # candidate of one judge branch (data/draft_mistakes.py); "" = none
    draft_mistakes_from: str = ""
    # the first this many train problems are mined for the draft's mistakes; 0 to train_problems
    draft_mistake_problems: int = 0
    # share of reasoning examples whose digit cells are randomly distorted (rotation, scale,
    # shift): the model learns digits, not the train pool's scans
    distort_fraction: float = 0.0
    # Judge every reading step of a chain both ways in its row (gold and corrupted candidates,
    # needs judge_branches): contrast pairs that differ only in the digits named
    read_pairs: bool = False
    # Held out of the judge's training, to test it on: steps written in these wordings (names of
    # dreamr_jax.data.wordings.FORM_NAMES) are never judge candidates, nor are the draft's
    # mistakes written in them
    judge_holdout_forms: tuple[str, ...] = ()
    # Held out of the judge's training, to test it on: corruptions of these kinds (misread,
    # arithmetic_slip, skipped_step, repeated_step) are never drawn
    judge_holdout_kinds: tuple[str, ...] = ()
    seq_len: int = 160  # every example is padded to this many tokens; longer ones are an error
    max_image_patches: int = 32  # every example's patches are padded to this many
    tokenizer: str = ""  # HF tokenizer folder; "" builds the default DigitMath tokenizer

    def validate(self, prefix: str = "data") -> None:
        if self.dataset != "digitmath":
            _fail(f"{prefix}.dataset", f"unknown dataset {self.dataset!r} (known: digitmath)")
        if self.wording not in WORDING_MIXES:
            _fail(
                f"{prefix}.wording",
                f"unknown mix {self.wording!r}; expected one of {WORDING_MIXES}",
            )
        if self.train_problems <= 0:
            _fail(f"{prefix}.train_problems", f"must be positive, got {self.train_problems}")
        _check_size(f"{prefix}.seq_len", self.seq_len, MAX_TOKENS, "tokens in an example")
        _check_size(
            f"{prefix}.max_image_patches",
            self.max_image_patches,
            MAX_PATCHES,
            "patches in an example",
        )
        if self.val_problems < 0 or self.data_seed < 0:
            _fail(prefix, "val_problems and data_seed must be non-negative")
        fractions = (
            "judge_fraction",
            "score_fraction",
            "drill_fraction",
            "count_drill_fraction",
            "distort_fraction",
        )
        for name in fractions:
            if not 0 <= getattr(self, name) <= 1:
                _fail(f"{prefix}.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        if self.judge_fraction + self.drill_fraction >= 1:
            _fail(prefix, "judge_fraction + drill_fraction must leave room for chains (< 1)")
        if self.judge_loss_weight <= 0:
            _fail(f"{prefix}.judge_loss_weight", "must be positive")
        if self.read_loss_weight <= 0:
            _fail(f"{prefix}.read_loss_weight", "must be positive")
        if self.content_error_weight <= 0:
            _fail(f"{prefix}.content_error_weight", "must be positive")
        if not 0 <= self.judge_branches <= MAX_STEPS_PER_PASS:
            _fail(
                f"{prefix}.judge_branches",
                f"must be in [0, {MAX_STEPS_PER_PASS}], got {self.judge_branches}",
            )
        unknown = set(self.judge_holdout_kinds) - set(CORRUPTION_KINDS)
        if unknown:
            _fail(f"{prefix}.judge_holdout_kinds", f"unknown kinds {sorted(unknown)}")
        if self.read_pairs and not self.judge_branches:
            _fail(f"{prefix}.read_pairs", "needs judge_branches > 0 (pairs are judge branches)")
        if not 0 <= self.draft_mistake_problems <= self.train_problems:
            _fail(
                f"{prefix}.draft_mistake_problems",
                f"must be in [0, train_problems={self.train_problems}], "
                f"got {self.draft_mistake_problems}",
            )
        if self.draft_mistakes_from and not (self.judge_branches and self.draft_mistake_problems):
            _fail(
                f"{prefix}.draft_mistakes_from",
                "needs judge_branches > 0 and draft_mistake_problems > 0 (the branches that judge "
                "the draft's mistakes)",
            )


@dataclass(frozen=True)
class EvalConfig:
    """End-of-training evaluation on the val split (greedy answers, and CPN for judges)."""

    problems: int = 200  # val problems answered (>= 0); the judge's AUROC is measured on them too
    # problems per generation pass, 1-65,536 (also judge queries per pass, and the batch that
    # mines data.draft_mistakes_from's mistakes)
    batch_size: int = 50
    # tokens one greedy answer may generate, 1-262,144 (also when mining the draft's mistakes)
    max_new_tokens: int = 160
    judge: bool = False  # also measure the AUROC of the CPN score on correct vs corrupted steps

    def validate(self, prefix: str = "eval") -> None:
        _check_size(f"{prefix}.batch_size", self.batch_size, MAX_BATCH, "problems in a pass")
        _check_size(
            f"{prefix}.max_new_tokens", self.max_new_tokens, MAX_TOKENS, "tokens in a chain"
        )
        if self.problems < 0:
            _fail(f"{prefix}.problems", "must be non-negative")


DEFAULT_ALPHA = 0.7  # the paper's CPN threshold
MODES = ("target", "draft", "sd", "specreason", "lookahead", "exact", "dreamr")
FALLBACKS = ("lazy", "eager", "resume")
ANSWER_TYPES = ("auto", "digitmath", "choice", "number", "text")  # data/answers.py
SCHEDULES = ("window", "sequential", "fpsr")


@dataclass(frozen=True)
class SpecConfig:
    """The decoding mode and its knobs (DESIGN.md sections 1-2)."""

    mode: str = "dreamr"  # target, draft, sd, specreason, lookahead, exact or dreamr (README)
    # dreamr: CPN accepts a step iff p > alpha; alpha >= 1 never accepts (the judge is still
    # asked: the output is the target's, at the judge's cost; the judge-free path is `exact`).
    # None: the pair's calibrated alpha where serve.py finds one (`python -m dreamr_jax.calibrate`
    # stores it with the draft), else DEFAULT_ALPHA (0.7)
    alpha: float | None = None
    window: int = 4  # W: draft steps verified together (exact, dreamr, lookahead)
    format_floor: float = 0.05  # s+ + s- below this: the judge ignored the format -> reject
    # dreamr: the target's step after a rejection (lazy), for every position alongside the
    # checks (eager), or, greedy, only up to its first token that differs from the rejected
    # step's, the draft writing the rest (resume; sampling decodes the whole step as lazy does).
    # `exact` always resumes.
    fallback: str = "resume"
    # exact, dreamr: when the draft works. window: the next W steps are drafted once this window
    # is decided (greedy resume on shared devices: one device loop); sequential: one step at a
    # time (SpecReason's); fpsr: the next window is drafted while the target checks this one, as
    # if every step is kept, and dropped when one is not (the draft's and the target's work
    # overlap where they have devices of their own, parallel.*)
    schedule: str = "window"
    # exact, dreamr: a draft window ends after a step in which the draft drew a token with
    # probability below this (0 = always W steps): the steps after a doubtful one are likely
    # thrown away
    draft_confidence: float = 0.8
    max_step_tokens: int = 48  # a step is cut here if it has not reached the delimiter
    max_new_tokens: int = 256  # whole chain
    sd_tokens: int = 4  # sd: draft tokens per verification
    score_threshold: int = 7  # specreason: keep a step whose 0-9 score is at least this
    temperature: float = 0.0  # 0 = greedy; otherwise sampling (sd uses Leviathan acceptance)

    def validate(self, prefix: str = "spec") -> None:
        if self.mode not in MODES:
            _fail(f"{prefix}.mode", f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.mode == "exact" and self.temperature > 0:
            _fail(f"{prefix}.temperature", "mode exact is greedy (sd samples losslessly)")
        if self.fallback not in FALLBACKS:
            _fail(f"{prefix}.fallback", f"{self.fallback!r} is not one of {FALLBACKS}")
        if self.schedule not in SCHEDULES:
            _fail(f"{prefix}.schedule", f"{self.schedule!r} is not one of {SCHEDULES}")
        if self.alpha is not None and not 0 <= self.alpha:
            _fail(f"{prefix}.alpha", f"must be >= 0, got {self.alpha}")
        if not 0 <= self.draft_confidence <= 1:
            _fail(f"{prefix}.draft_confidence", f"must be in [0, 1], got {self.draft_confidence}")
        if not 0 <= self.format_floor < 1:
            _fail(f"{prefix}.format_floor", f"must be in [0, 1), got {self.format_floor}")
        _check_size(
            f"{prefix}.window", self.window, MAX_STEPS_PER_PASS, "steps in one verification pass"
        )
        _check_size(
            f"{prefix}.max_step_tokens", self.max_step_tokens, MAX_STEP_TOKENS, "tokens in a step"
        )
        _check_size(
            f"{prefix}.max_new_tokens", self.max_new_tokens, MAX_TOKENS, "tokens in a chain"
        )
        _check_size(f"{prefix}.sd_tokens", self.sd_tokens, MAX_STEP_TOKENS, "tokens in a proposal")
        if self.window * self.max_step_tokens > MAX_TOKENS:
            _fail(
                f"{prefix}.window",
                f"{self.window} steps of up to max_step_tokens={self.max_step_tokens} exceed "
                f"{MAX_TOKENS:,} tokens in one verification pass",
            )
        if not 0 <= self.score_threshold <= 9:
            _fail(f"{prefix}.score_threshold", f"must be in 0-9, got {self.score_threshold}")
        if self.temperature < 0:
            _fail(f"{prefix}.temperature", f"must be >= 0, got {self.temperature}")

    def runs_on_device(self, one_program: bool) -> bool:
        """Whether the mode runs as one device loop over a batch of rows (continuous batching;
        everything else is a host loop, one request at a time): `target` and `draft` always;
        where draft and target can run in one program (`one_program`: on shared devices, and no
        host loop asked for), greedy `sd`, and with the `window` schedule `exact` and greedy
        `dreamr` with the `resume` fallback. The engine and serve.py's config check both ask
        this."""
        if self.mode in ("target", "draft"):
            return True
        if not one_program or self.temperature > 0:
            return False
        if self.mode == "sd":
            return True
        window = self.schedule == "window"
        return window and (
            self.mode == "exact" or (self.mode == "dreamr" and self.fallback == "resume")
        )


STAGES = ("sft", "sapo")
# SAPO's registered parts (dreamr_jax.rl.registry; the stage checks the names at start-up)
DEFAULT_REWARDS = {"outcome": 1.0, "draft": 1.0, "length": 1.0}


@dataclass(frozen=True)
class SapoConfig:
    """Stage `sapo`: RL of the draft (`train.init_from`, also the frozen KL reference) against a
    frozen target's CPN verdicts. Optimiser, steps and checkpoints come from `train`."""

    target: str = "checkpoints/digitmath/target"  # checkpoint folder of the frozen judge
    group_size: int = 8  # G: rollouts per prompt
    prompts: int = 8  # prompts per update (rows: prompts * G)
    temperature: float = 1.0  # the rollouts' sampling temperature
    max_new_tokens: int = 160  # a rollout's budget; it ends at the first step end past it
    max_step_tokens: int = 48  # a step is cut here, as the engine cuts it
    alpha: float | None = None  # None: the pair's calibrated alpha (serve.checkpoints.pair_alpha)
    format_floor: float = 0.05  # s+ + s- below this: the step is not accepted (the engine's rule)
    # reward term name -> weight (dreamr_jax.rl.rewards: outcome, draft, draft_soft, kept, length)
    rewards: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REWARDS))
    advantage: str = "grpo"  # dreamr_jax.rl.advantages
    policy_loss: str = "grpo"  # dreamr_jax.rl.losses
    epsilon: float = 0.2  # the surrogate's clip
    beta: float = 0.04  # weight of the KL to the reference draft
    micro_batches: int = 1  # gradient accumulation: rows per forward/backward = rows / this
    # the update's backward pass recomputes each decoder layer's activations from its input
    # instead of keeping them all (memory for ~a third more compute; the same gradient)
    remat: bool = False

    def validate(self, prefix: str = "sapo") -> None:
        _check_size(f"{prefix}.group_size", self.group_size, MAX_BATCH, "rollouts per prompt")
        _check_size(f"{prefix}.prompts", self.prompts, MAX_BATCH, "prompts per update")
        _check_size(f"{prefix}.max_new_tokens", self.max_new_tokens, MAX_TOKENS, "chain tokens")
        _check_size(f"{prefix}.max_step_tokens", self.max_step_tokens, MAX_STEP_TOKENS, "tokens")
        if self.temperature <= 0:
            _fail(
                f"{prefix}.temperature",
                f"rollouts are sampled: must be > 0, got {self.temperature}",
            )
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            _fail(f"{prefix}.alpha", f"must be in [0, 1], got {self.alpha}")
        if not 0 <= self.format_floor <= 1:
            _fail(f"{prefix}.format_floor", f"must be in [0, 1], got {self.format_floor}")
        if not self.rewards:
            _fail(f"{prefix}.rewards", "name at least one reward term")
        for name, weight in self.rewards.items():
            if not math.isfinite(weight):
                _fail(f"{prefix}.rewards.{name}", f"must be finite, got {weight}")
        if not 0 < self.epsilon < 1:
            _fail(f"{prefix}.epsilon", f"must be in (0, 1), got {self.epsilon}")
        if self.beta < 0:
            _fail(f"{prefix}.beta", f"must be >= 0, got {self.beta}")
        rows = self.prompts * self.group_size
        if self.micro_batches < 1 or rows % self.micro_batches:
            _fail(
                f"{prefix}.micro_batches",
                f"{self.micro_batches} does not divide the {rows} rows of an update",
            )


@dataclass(frozen=True)
class Config:
    """A run: the model, where it lives, and what the entry point does with it."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the model trained
    mesh: MeshConfig = field(default_factory=MeshConfig)  # devices the run is sharded over
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # several hosts
    train: TrainConfig = field(default_factory=TrainConfig)  # optimiser and checkpoints
    data: DataConfig = field(default_factory=DataConfig)  # the training data
    prompt: PromptConfig = field(default_factory=PromptConfig)  # chat and judge-query format
    eval: EvalConfig = field(default_factory=EvalConfig)  # end-of-training evaluation
    sapo: SapoConfig = field(default_factory=SapoConfig)  # RL settings of stage sapo
    # "sft" (supervised training) or "sapo" (RL of a draft against a frozen target's judge)
    stage: str = "sft"
    seed: int = 0  # model init, data order and rollout sampling (data.data_seed: the problems)
    dtype: str = "float32"  # dtype of the models' weights: float32, bfloat16 or float16
    # the run's folder: checkpoints/, metrics/, config.yaml, eval.json; a rerun resumes from it
    output_dir: str = "runs/default"
    export_dir: str = ""  # where the final HF checkpoint goes; "" means <output_dir>/hf

    def validate(self, prefix: str = "") -> None:
        self.model.validate("model")
        self.mesh.validate("mesh")
        self.distributed.validate("distributed")
        self.train.validate("train")
        self.data.validate("data")
        self.prompt.validate("prompt")
        self.eval.validate("eval")
        self.sapo.validate("sapo")
        if self.stage not in STAGES:
            _fail("stage", f"unknown stage {self.stage!r}; expected one of {STAGES}")
        if self.stage == "sapo" and not self.train.init_from:
            _fail("train.init_from", "stage sapo starts from a draft checkpoint folder; name it")
        _check_dtype("dtype", self.dtype)


def is_config_class(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# --------------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint folder (HF layout); "" means the shipped DigitMath model."""

    path: str = ""  # "" = checkpoints/digitmath/target (or .../draft for `draft`)
    dtype: str = "float32"  # dtype the weights are loaded in: float32, bfloat16 or float16
    # decoder layers stacked and run by lax.scan (model.text.scan_layers): compile time flat in
    # depth, for deep models; the default loop is the faster on small ones
    scan_layers: bool = False

    def validate(self, prefix: str) -> None:
        _check_dtype(f"{prefix}.dtype", self.dtype)


@dataclass(frozen=True)
class ServeParallelConfig:
    """Where serve.py puts the models: both on the first device (0, 0), or the draft on the
    first `draft_devices` devices and the target on the next `target_devices`, its weights
    sharded over them by the rule table (tensor parallel)."""

    draft_devices: int = 0  # devices of the draft's submesh; 0: share the target's device
    target_devices: int = 0  # devices of the target's submesh; 0: the first device alone
    # GiB of memory each device has, which `python -m dreamr_jax.plan --serve` checks the run's
    # plan against (0: not checked)
    device_memory_gib: float = 0.0

    def validate(self, prefix: str = "parallel") -> None:
        if self.device_memory_gib < 0:
            _fail(f"{prefix}.device_memory_gib", f"must be >= 0, got {self.device_memory_gib}")
        for key in ("draft_devices", "target_devices"):
            if not 0 <= getattr(self, key) <= MAX_BATCH:
                _fail(f"{prefix}.{key}", f"must be in [0, {MAX_BATCH:,}]")
        if (self.draft_devices == 0) != (self.target_devices == 0):
            _fail(
                f"{prefix}.draft_devices",
                "draft_devices and target_devices are both 0 (one device) or both set",
            )


@dataclass(frozen=True)
class ServeDataConfig:
    """Input of serve.py: a JSONL file (DESIGN.md section 6), or "" for the DigitMath test split
    (`digitmath_problems` problems, generated next to the output)."""

    input: str = ""  # JSONL of records {"id", "image", "question", "answer"?}; "" = DigitMath test
    limit: int = 0  # 0 = every record
    digitmath_problems: int = 200  # problems of the DigitMath test split, 1-65,536 (input "")
    # Per-record limits: a record over them gets an `error` line (checked from the image file's
    # header, before anything is decoded)
    max_image_pixels: int = 40_000_000  # width x height of one image
    max_images: int = 16  # images in one record, 1-256; a record with more gets an `error` line
    # How answers are graded where a record names no `answer_type` of its own: choice (an
    # option letter A-J), number (within number_tolerance), text (normalised), digitmath (the
    # task's own grader), or auto: digitmath for the embedded default input, else the type each
    # gold answer reads as (dreamr_jax/data/answers.py)
    answer_type: str = "auto"
    # number answers: right within this much of the gold, relative (absolute below 1)
    number_tolerance: float = 1e-4

    def validate(self, prefix: str = "data") -> None:
        if self.answer_type not in ANSWER_TYPES:
            _fail(
                f"{prefix}.answer_type",
                f"{self.answer_type!r} is not one of {', '.join(ANSWER_TYPES)}",
            )
        if not 0 <= self.number_tolerance < 1:
            _fail(f"{prefix}.number_tolerance", f"must be in [0, 1), got {self.number_tolerance}")
        if self.limit < 0:
            _fail(f"{prefix}.limit", f"must be >= 0, got {self.limit}")
        _check_size(f"{prefix}.digitmath_problems", self.digitmath_problems, MAX_BATCH, "problems")
        _check_size(f"{prefix}.max_image_pixels", self.max_image_pixels, MAX_IMAGE_PIXELS, "pixels")
        _check_size(f"{prefix}.max_images", self.max_images, MAX_IMAGES, "images in a record")


@dataclass(frozen=True)
class ServeConfig:
    """A serve.py run: which models, which mode, which inputs, where the records go."""

    target: ModelRef = field(default_factory=ModelRef)  # the target model
    draft: ModelRef = field(default_factory=ModelRef)  # the draft model (not loaded in mode target)
    data: ServeDataConfig = field(default_factory=ServeDataConfig)  # the input records
    spec: SpecConfig = field(default_factory=SpecConfig)  # the decoding mode and its knobs
    prompt: PromptConfig = field(default_factory=PromptConfig)  # chat and judge-query format
    parallel: ServeParallelConfig = field(default_factory=ServeParallelConfig)  # devices
    # JSONL file the answers are appended to (summary: <output>.summary.json); a rerun answers only
    # the records it lacks
    output: str = "runs/serve/output.jsonl"
    seed: int = 0  # seed of the random draws of sampling (spec.temperature > 0)
    # Requests in flight at once (continuous batching: a finished one is replaced at once). Above
    # 1 the mode must run as a device loop: target, draft, greedy sd, exact, or greedy dreamr with
    # fallback resume
    batch_size: int = 1
    warmup: int = 2  # problems solved (and discarded) first, so compilation is not timed
    # Compiled programs persist here across runs (empty = off): a second `python serve.py`
    # skips the ~25 s of compilation. Entries are keyed by program and JAX version.
    compilation_cache: str | None = "~/.cache/dreamr_jax/xla"
    # An output file whose records came from other settings (mode, alpha, models, ...) is
    # refused unless this is set: its summary would mix them
    allow_mixed_settings: bool = False

    def validate(self, prefix: str = "") -> None:
        self.target.validate("target")
        self.draft.validate("draft")
        self.data.validate("data")
        self.spec.validate("spec")
        self.prompt.validate("prompt")
        self.parallel.validate("parallel")
        if not self.output:
            _fail("output", "must name a JSONL file")
        if not 0 <= self.warmup <= MAX_WARMUP:
            _fail("warmup", f"must be in [0, {MAX_WARMUP}], got {self.warmup}")
        _check_size("batch_size", self.batch_size, MAX_BATCH, "requests in flight")
        apart = self.parallel.draft_devices > 0
        if self.batch_size > 1 and not self.spec.runs_on_device(one_program=not apart):
            _fail(
                "batch_size",
                f"{self.batch_size} needs a mode that runs as a device loop (target, draft, or, "
                "on shared devices, greedy sd, and with spec.schedule=window exact or greedy "
                f"dreamr with spec.fallback=resume); spec.mode={self.spec.mode} here answers one "
                "request at a time",
            )
