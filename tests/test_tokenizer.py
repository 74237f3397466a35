"""The DigitMath tokenizer: round trips, Qwen-layout special ids, delimiter, HF loading, chat."""

import json

import pytest
from transformers import AutoTokenizer

from dreamr_jax.data import digitmath as dm
from dreamr_jax.data import tokenizer as tk


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The default tokenizer (smaller corpus for speed) and the folder it was saved to."""
    out = tmp_path_factory.mktemp("tokenizer")
    return tk.build_default_tokenizer(out, seed=0, n_problems=1500), out


@pytest.fixture(scope="module")
def texts():
    items = dm.generate_problems("test", 40, seed=11)
    return [p.question + dm.STEP_DELIMITER + p.reasoning for p in items]


def test_vocab_size_and_special_ids(saved):
    tok, _ = saved
    assert len(tok) == tk.DEFAULT_VOCAB_SIZE == 512
    expected = {
        "<|endoftext|>": 496,
        "<|im_start|>": 497,
        "<|im_end|>": 498,
        "<|vision_start|>": 505,
        "<|vision_end|>": 506,
        "<|image_pad|>": 508,
        "<|video_pad|>": 509,
        "<think>": 510,
        "</think>": 511,
    }
    for token, token_id in expected.items():
        assert tk.SPECIAL_TOKEN_IDS[token] == token_id
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok.encode(token) == [token_id]
        assert tok.encode(f"a{token}b")[1] == token_id  # matched inside running text too
    assert tok.eos_token_id == 498 and tok.pad_token_id == 496 and tok.bos_token_id is None
    # Ids match the tiny model config's defaults.
    from dreamr_jax.config.schema import ModelConfig

    cfg = ModelConfig()
    assert cfg.image_token_id == expected["<|image_pad|>"]
    assert cfg.vision_start_token_id == expected["<|vision_start|>"]
    assert cfg.pad_token_id == expected["<|endoftext|>"] and 498 in cfg.eos_token_ids


def test_round_trip(saved, texts):
    tok, _ = saved
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_delimiter_digits_and_judge_words_are_single_tokens(saved, texts):
    tok, _ = saved
    delimiter = tok.encode(dm.STEP_DELIMITER)
    assert len(delimiter) == 1
    for word in (" Yes", " No", "Yes", "No"):
        assert len(tok.encode(word)) == 1, word
    assert len(tok.encode("2026")) == 4  # one token per digit
    # In context the delimiter is its own token, once per step boundary ("7.\n\n" does not merge).
    for text in texts:
        ids = tok.encode(text)
        assert ids.count(delimiter[0]) == text.count(dm.STEP_DELIMITER)


def test_auto_tokenizer_loads_the_saved_folder(saved, texts):
    tok, out = saved
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in out.iterdir()
    }
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == len(tok)
    for text in texts[:10]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_token_id == 498 and loaded.pad_token_id == 496
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"


def test_chat_template_renders(saved):
    _, out = saved
    tok = AutoTokenizer.from_pretrained(str(out))
    messages = [
        {"role": "system", "content": "Solve the problem step by step."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Sum?"}]},
        {"role": "assistant", "content": "1 + 2 = 3.\n\nThe answer is 3."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nSolve the problem step by step.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Sum?<|im_end|>\n"
        "<|im_start|>assistant\n1 + 2 = 3.\n\nThe answer is 3.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    thinking = tok.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    ids = tok.encode(prompt)
    assert ids.count(508) == 1 and ids[0] == 497


def test_deterministic_build(saved):
    tok, _ = saved
    again = tk.build_default_tokenizer(None, seed=0, n_problems=1500)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ValueError, match="BPE tokens"):
        tk.train_tokenizer(["tiny text"], vocab_size=512)
