"""The judge formats of stock Qwen3-VL targets (`configs/qwen3vl/judge_*.yaml`): after a candidate
step the assistant turn closes, a user turn asks about the last step, and the query ends at the
assistant's header (after an empty think block for Thinking models), so that the next token is
the verdict. Built with the project's tokenizer, which has Qwen's special tokens; with Qwen's
own, `PromptBuilder.create` refuses a verdict word that is not one token."""

from __future__ import annotations

import pytest

from dreamr_jax.config import load_config
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.data.tokenizer import build_default_tokenizer

ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


@pytest.mark.parametrize(
    "family, answer_after", [("instruct", ""), ("thinking", "<think>\n\n</think>\n\n")]
)
def test_a_stock_model_is_asked_in_a_user_turn_and_answers_first(tokenizer, family, answer_after):
    model = load_config("configs/digitmath/base.yaml").model
    prompt = load_config(f"configs/qwen3vl/judge_{family}.yaml").prompt
    builder = PromptBuilder.create(tokenizer, model, prompt)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    for suffix, question in (
        (builder.judge_suffix_ids, "Answer Yes or No."),
        (builder.score_suffix_ids, "Answer with one digit."),
    ):
        text = tokenizer.decode(suffix, skip_special_tokens=False)
        # The turn markers are the special tokens themselves, not text that spells them.
        assert suffix[0] == special["<|im_end|>"]
        assert list(suffix).count(special["<|im_start|>"]) == 2
        assert text.startswith("<|im_end|>\n<|im_start|>user\n")
        assert text.endswith(question + ASSISTANT + answer_after)
    assert builder.positive_ids == tuple(tokenizer.encode("Yes", add_special_tokens=False))
    assert builder.negative_ids == tuple(tokenizer.encode("No", add_special_tokens=False))
    assert prompt.enable_thinking == (family == "thinking")

    # A step in the middle of the chain: its delimiter, then the turn closes once.
    middle = builder.judge_ids(builder.step_ids("The top row shows 3, 7 and 1.", final=False))
    text = tokenizer.decode(middle, skip_special_tokens=False)
    assert text.startswith("The top row shows 3, 7 and 1.\n\n<|im_end|>\n<|im_start|>user\n")
    # The final step ends with EOS, Qwen's <|im_end|>: the query holds it twice (the suffix is
    # the same after every step of a verification window; judge_instruct.yaml says why).
    final = builder.judge_ids(builder.step_ids("The answer is 5.", final=True))
    assert tokenizer.decode(final, skip_special_tokens=False).startswith(
        "The answer is 5.<|im_end|><|im_end|>\n<|im_start|>user\n"
    )
