"""A small byte-level BPE tokenizer for DigitMath, laid out like Qwen's.

Qwen's vocabulary is byte-level BPE followed by added tokens in a fixed order (<|endoftext|> at
151643, <|im_start|> 151644, <|im_end|> 151645, ... <|vision_start|> 151652, <|image_pad|> 151655,
<|video_pad|> 151656, ..., <think> 151667, </think> 151668). This tokenizer keeps that order and the
offsets between the chat/vision tokens, just shifted down to the end of a small vocabulary: with the
default 512 tokens, <|endoftext|> is 496, <|im_end|> 498, <|vision_start|> 505, <|image_pad|> 508,
<|video_pad|> 509, <think> 510, </think> 511 -- the ids `configs/models/tiny.yaml` and the config
schema defaults use. It is saved in Hugging Face format and loads with `AutoTokenizer`.

Pre-tokenisation follows Qwen's (its split regex, digits one by one, byte-level without a regex),
with one change: punctuation does not swallow the newlines after it, so the step delimiter "\\n\\n"
is always a token of its own and a step ends exactly on that token id.

Usage:
    python -m dreamr_jax.data.tokenizer --out assets/tokenizer
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, trainers
from tokenizers import pre_tokenizers as pre
from transformers import PreTrainedTokenizerFast

from dreamr_jax.data import digitmath

DEFAULT_VOCAB_SIZE = 512

# Qwen's added tokens from <|endoftext|> to <|video_pad|>, then <think> and </think>. Keeping the
# filler tokens between them (object_ref, box, quad, vision_pad) keeps Qwen's id offsets, so
# e.g. image_pad - vision_start is 3 here as in Qwen. Value: whether the token is "special"
# (skipped by decode(skip_special_tokens=True)); Qwen marks <think> and </think> as not special.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<think>", False),
    ("</think>", False),
)
N_ADDED = len(QWEN_ADDED_TOKENS)

# Qwen2/3's split regex, except that `[^\s\p{L}\p{N}]+` no longer takes trailing `[\r\n]*`:
# "7.\n\n" must split as "7", ".", "\n\n" so the delimiter never hides inside a bigger token.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3-VL's template, reduced to what the project uses: optional system message, user content as
# a string or a list of {"type": "image"|"video"|"text"} parts, assistant turns, and the generation
# prompt (with an opened <think> block when enable_thinking is true, as Qwen3 thinking models do).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}"
    "{{- '<think>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Text the models read or write besides the problems themselves: chat roles, the step judge
# prompts (CPN's yes/no question, SpecReason's 0-9 score) and their answers, and the plain words
# of a step-by-step explanation. Repeated in the corpus so each word, " Yes" and " No" included,
# becomes one token (the problems alone saturate BPE below the 496 base tokens of the default).
EXTRA_TEXTS: tuple[str, ...] = (
    "system",
    "user",
    "assistant",
    "You are a careful assistant. Solve the problem step by step.",
    "Look at the image and answer the question. Think step by step.",
    "Is this step correct? Answer Yes or No.",
    "Is the last step correct? Answer Yes or No.",
    "Step:",
    "Answer:",
    "Answer: Yes",
    "Answer: No",
    "Yes",
    "No",
    "Yes.",
    "No.",
    "Rate the last step from 0 to 9, where 9 means certainly correct.",
    "Score:",
    "Let me read the digits first. Then I add, subtract or multiply them one at a time.",
    "First, second, third and fourth column. Next, finally, therefore, so the result is.",
    "zero one two three four five six seven eight nine ten",
    "Zero One Two Three Four Five Six Seven Eight Nine Ten",
    "The question asks for a number. Wait, let me check that again. This is wrong.",
)


def special_token_ids(vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict[str, int]:
    """Id of every added token for a vocabulary of `vocab_size` (they fill its last slots)."""
    first = vocab_size - N_ADDED
    return {token: first + i for i, (token, _) in enumerate(QWEN_ADDED_TOKENS)}


# Ids of the default 512-token vocabulary, e.g. SPECIAL_TOKEN_IDS["<|image_pad|>"] == 508.
SPECIAL_TOKEN_IDS: dict[str, int] = special_token_ids()


def _backend(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    """An untrained Qwen-style byte-level BPE and the trainer for its base vocabulary."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre.Sequence(
        [
            pre.Digits(individual_digits=True),
            pre.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - N_ADDED,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre.ByteLevel.alphabet(),
        special_tokens=[],
    )
    return tokenizer, trainer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Trains the BPE on `texts` and appends the Qwen added tokens as the last `N_ADDED` ids.

    `vocab_size` counts everything. The texts must be rich enough to fill the base vocabulary
    (vocab_size - N_ADDED tokens), else the added tokens would not land on their fixed ids.
    """
    if vocab_size <= 256 + N_ADDED:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges beyond the 256 bytes")
    tokenizer, trainer = _backend(vocab_size)
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    base = tokenizer.get_vocab_size()
    if base != vocab_size - N_ADDED:
        raise ValueError(
            f"the texts support only {base} BPE tokens, fewer than the {vocab_size - N_ADDED} "
            f"needed for vocab_size {vocab_size}; give more varied text or a smaller vocab_size"
        )
    # normalized=False: the added tokens match the raw text, as in Qwen's tokenizer.json.
    tokenizer.add_tokens(
        [
            AddedToken(token, special=special, normalized=False)
            for token, special in QWEN_ADDED_TOKENS
        ]
    )
    return _wrap(tokenizer)


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers view: Qwen's eos/pad, no bos/unk, the chat template."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=4096,
        padding_side="left",  # batched generation pads on the left
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def digitmath_corpus(n_problems: int = 3000, seed: int = 0) -> list[str]:
    """Training text: DigitMath questions, gold chains, corrupted steps and the judge texts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for problem in digitmath.generate_problems("train", n_problems, seed):
        texts.append(problem.question)
        texts.append(problem.reasoning)
        # Wrong steps use the same words, but misreads and slips add numbers in new places.
        index = int(rng.integers(len(problem.steps)))
        if digitmath.applicable_kinds(problem, index):
            texts.append(digitmath.corrupt_step(problem, index, rng)[0])
    texts.extend(list(EXTRA_TEXTS) * 200)
    return texts


def build_default_tokenizer(
    out_dir: str | Path | None = None,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    n_problems: int = 3000,
) -> PreTrainedTokenizerFast:
    """The project's tokenizer, trained on DigitMath train text; saved to out_dir if given.

    Deterministic: the same arguments give the same tokenizer files.
    """
    tokenizer = train_tokenizer(digitmath_corpus(n_problems, seed), vocab_size)
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """save_pretrained plus the files older transformers versions and other tools look for.

    transformers 5 writes tokenizer.json, tokenizer_config.json and chat_template.jinja and
    names the class "TokenizersBackend"; naming it "PreTrainedTokenizerFast" (an alias in 5.x)
    and adding special_tokens_map.json keeps the folder loadable by 4.x as well.
    """
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special_map = {
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": [tok for tok, special in QWEN_ADDED_TOKENS if special],
    }
    (out / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2) + "\n", encoding="utf-8"
    )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: build the default tokenizer into a folder."""
    parser = argparse.ArgumentParser(description="Train the DigitMath tokenizer (HF format).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    tokenizer = build_default_tokenizer(args.out, args.seed, args.vocab_size)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
