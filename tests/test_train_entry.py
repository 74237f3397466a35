"""`python train.py` end to end on a tiny model: trains, evaluates, resumes instead of retraining,
and exports a checkpoint that transformers loads with logits equal to ours."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hf_reference import TOL, Prompt, hf_logits, load_hf, max_abs, our_logits
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

import train
from dreamr_jax.config import load_config
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.models.hf_io import load_pretrained
from dreamr_jax.models.processor import make_image_processor, process_images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    args = [
        "--config",
        "configs/digitmath/base.yaml",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.batch_size=4",
        "train.log_every=1",
        "train.save_every=2",
        "data.train_problems=16",
        "data.judge_fraction=0.25",
        "data.seq_len=208",  # a judge example on a count_greater step needs up to 187 tokens
        "eval.problems=2",
        "eval.batch_size=2",
        "eval.max_new_tokens=8",
        "eval.judge=true",
        f"output_dir={out}",
        f"export_dir={out / 'hf'}",
    ]
    assert train.main(args) == 0
    return out, args


def test_train_writes_metrics_eval_and_config(run):
    out, _ = run
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["step"] == 4 and metrics["eval/problems"] == 2
    assert 0 <= metrics["eval/judge_auroc"] <= 1
    lines = (out / "metrics" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines[:4]] == [1, 2, 3, 4]
    assert load_config(str(out / "config.yaml")).train.steps == 4


def test_rerun_resumes_from_the_last_checkpoint(run, capsys):
    out, args = run
    before = (out / "hf" / "model.safetensors").read_bytes()
    assert train.main(args) == 0
    # Nothing left to train: the export is of the restored, identical parameters.
    assert (out / "hf" / "model.safetensors").read_bytes() == before


def test_bad_override_is_a_clear_error(capsys):
    assert train.main(["--config", "configs/digitmath/base.yaml", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_export_loads_in_transformers_with_equal_logits(run):
    out, _ = run
    path = str(out / "hf")
    assert os.path.exists(os.path.join(path, "preprocessor_config.json"))
    ours = load_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    assert processor.patch_size == ours.config.vision.patch_size
    cfg = load_config("configs/digitmath/base.yaml")
    builder = PromptBuilder.create(tokenizer, ours.config, cfg.prompt)
    problem = digitmath.generate_problems("test", 1, 0)[0]
    pixel_values, grid = process_images(processor, [problem_image(problem)])
    want_pixels, _ = process_images(
        make_image_processor(ours.config.vision), [problem_image(problem)]
    )
    np.testing.assert_array_equal(pixel_values, want_pixels)
    ids = builder.prompt_ids(problem.question, [grid[0].tolist()])
    ids += builder.steps_ids(problem.steps[:2], complete=False)
    ids = np.asarray([ids])
    prompt = Prompt(ids, np.ones_like(ids, bool), pixel_values, grid)
    assert max_abs(our_logits(ours, prompt), hf_logits(load_hf(path), ours.config, prompt)) < TOL
