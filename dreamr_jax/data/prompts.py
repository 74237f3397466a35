"""The one code path from (images, question, steps so far) to token ids, for tiny and real models.

The chat comes from the tokenizer's own chat template (Qwen's for real checkpoints, the project's
for the DigitMath tokenizer); every image placeholder is then expanded to one image token per
merged patch, as transformers' Qwen3-VL processor does. Steps are tokenized one by one and end
with the step delimiter, or with EOS for the final step, so that a chain is the concatenation of
its steps and a context can grow step by step (which is what the KV caches of the engine hold).

A judge query (CPN) is `context + candidate step (with its terminator) + judge suffix`; the
target's next-token distribution over the positive and negative words is the verdict. SpecReason's
query is the same with the score suffix, answered by one digit token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dreamr_jax.config.schema import ModelConfig, PromptConfig
from dreamr_jax.models.processor import image_token_count


@dataclasses.dataclass(frozen=True)
class PromptBuilder:
    """Token-id builder bound to a tokenizer, a model config and a prompt config."""

    tokenizer: object
    model: ModelConfig
    prompt: PromptConfig
    delimiter_ids: tuple[int, ...]
    eos_id: int
    judge_suffix_ids: tuple[int, ...]
    positive_ids: tuple[int, ...]
    negative_ids: tuple[int, ...]
    score_suffix_ids: tuple[int, ...]
    score_ids: tuple[int, ...]  # the tokens "0" .. "9"

    @classmethod
    def create(cls, tokenizer, model: ModelConfig, prompt: PromptConfig) -> PromptBuilder:
        """Checks that the judge words are single tokens and that EOS is the model's."""

        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        def single(word: str, key: str) -> int:
            ids = encode(word)
            if len(ids) != 1:
                raise ValueError(
                    f"prompt.{key}: {word!r} is {len(ids)} tokens for this tokenizer; "
                    "judge words must be single tokens"
                )
            return ids[0]

        model.require_generation_ids()
        eos_id = model.eos_token_ids[0]
        return cls(
            tokenizer=tokenizer,
            model=model,
            prompt=prompt,
            delimiter_ids=encode(prompt.step_delimiter),
            eos_id=eos_id,
            judge_suffix_ids=encode(prompt.judge_suffix),
            positive_ids=tuple(single(w, "positive_words") for w in prompt.positive_words),
            negative_ids=tuple(single(w, "negative_words") for w in prompt.negative_words),
            score_suffix_ids=encode(prompt.score_suffix),
            score_ids=tuple(single(str(d), "score_suffix") for d in range(10)),
        )

    # ------------------------------------------------------------------------------- pieces

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, question: str, image_grids: Sequence[Sequence[int]]) -> list[int]:
        """Chat up to and including the assistant header, one expanded placeholder per image.

        image_grids: `[images, 3]` (t, h, w) patch grids from the image processor.
        """
        content = [{"type": "image"} for _ in image_grids] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if self.prompt.system:
            messages.insert(0, {"role": "system", "content": self.prompt.system})
        text = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=self.prompt.enable_thinking,
        )
        ids = self.encode(text)
        image_id = self.model.image_token_id
        if ids.count(image_id) != len(image_grids):
            raise ValueError(
                f"the chat template produced {ids.count(image_id)} image placeholders for "
                f"{len(image_grids)} images"
            )
        grids = iter(image_grids)
        out: list[int] = []
        for token in ids:
            if token == image_id:
                out.extend([image_id] * image_token_count(self.model, next(grids)))
            else:
                out.append(token)
        return out

    def step_ids(self, step: str, *, final: bool) -> list[int]:
        """One step and its terminator: the delimiter, or EOS after the final step."""
        return self.encode(step) + ([self.eos_id] if final else list(self.delimiter_ids))

    def steps_ids(self, steps: Sequence[str], *, complete: bool) -> list[int]:
        """Steps in order; with `complete`, the last one is the final step (ends with EOS)."""
        out: list[int] = []
        for i, step in enumerate(steps):
            out += self.step_ids(step, final=complete and i == len(steps) - 1)
        return out

    def decode(self, tokens: Sequence[int]) -> str:
        """Generated ids up to the first EOS, as text (special tokens dropped)."""
        tokens = [int(t) for t in tokens]
        eos = set(self.model.eos_token_ids)
        end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        return self.tokenizer.decode(tokens[:end], skip_special_tokens=True)

    def judge_ids(self, candidate_ids: Sequence[int], *, score: bool = False) -> list[int]:
        """What follows a context to ask the judge about `candidate_ids` (a step + terminator):
        CPN's yes/no question, or with `score` SpecReason's 0-9 rating."""
        suffix = self.score_suffix_ids if score else self.judge_suffix_ids
        return list(candidate_ids) + list(suffix)

    def verdict_id(self, correct: bool, *, score: bool = False) -> int:
        """The token a trained judge answers with (a 9 or a 0 in the score format)."""
        if score:
            return self.score_ids[9] if correct else self.score_ids[0]
        return self.positive_ids[0] if correct else self.negative_ids[0]
