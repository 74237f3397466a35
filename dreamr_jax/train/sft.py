"""Stage `sft`: supervised training of a DigitMath model (target or draft), from scratch or from
a checkpoint (`train.init_from`), its evaluation on the val split, and its export as a Hugging
Face checkpoint directory."""

from __future__ import annotations

import json
import os
import time

from transformers import AutoTokenizer

from dreamr_jax.config.loader import save_config
from dreamr_jax.config.schema import Config, DataConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.draft_mistakes import DraftMistake, load_mistakes, mistakes_of, save_mistakes
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.data.sft import SFTExampleBuilder, sft_dataset
from dreamr_jax.data.tokenizer import build_default_tokenizer, save_tokenizer
from dreamr_jax.models.hf_io import load_pretrained, save_pretrained
from dreamr_jax.models.init import init_model
from dreamr_jax.models.processor import make_image_processor
from dreamr_jax.parallel.distributed import is_primary
from dreamr_jax.parallel.mesh import mesh_from_config
from dreamr_jax.provenance import provenance
from dreamr_jax.serve.checkpoints import load_checkpoint, weights_digest
from dreamr_jax.train.evaluate import greedy_solve, judge_auroc
from dreamr_jax.train.trainer import Trainer


def load_tokenizer(data: DataConfig):
    """The configured tokenizer folder, or the default DigitMath tokenizer (deterministic)."""
    if data.tokenizer:
        return AutoTokenizer.from_pretrained(data.tokenizer)
    return build_default_tokenizer()


def export_checkpoint(model, tokenizer, processor, path: str) -> str:
    """Weights + config.json (safetensors), tokenizer and preprocessor config in one folder, the
    layout transformers' `from_pretrained` and `dreamr_jax.load_pretrained` both read. Every
    process of a multi-host run calls it (the weights are gathered); process 0 writes."""
    save_pretrained(model, path)
    if not is_primary():
        return path
    save_tokenizer(tokenizer, path)
    processor.save_pretrained(path)
    return path


def evaluate_model(cfg: Config, model, builder: PromptBuilder, processor) -> dict:
    """Greedy answer accuracy on `eval.problems` val problems, and the judge AUROC if asked."""
    problems = digitmath.generate_problems(
        "val", cfg.eval.problems, cfg.data.data_seed, cfg.data.wording
    )
    started = time.perf_counter()
    results = greedy_solve(
        model,
        builder,
        processor,
        problems,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    metrics = {
        "accuracy": sum(r["correct"] for r in results) / max(len(results), 1),
        "problems": len(results),
        "generate_s": time.perf_counter() - started,
    }
    if cfg.eval.judge:
        examples = SFTExampleBuilder.for_evaluation(problems, builder, processor, cfg.data)
        metrics.update(
            judge_auroc(model, examples, seed=cfg.data.data_seed, batch_size=cfg.eval.batch_size)
        )
    return metrics


def draft_mistakes(cfg: Config, problems) -> dict[int, DraftMistake]:
    """The configured draft's first mistakes on the first `data.draft_mistake_problems` train
    problems (greedy), mined once and kept in `<output_dir>/draft_mistakes.json`, so that a
    resumed run trains on the same examples. Empty when `data.draft_mistakes_from` is unset."""
    data = cfg.data
    if not data.draft_mistakes_from:
        return {}
    weights = os.path.join(data.draft_mistakes_from, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"data.draft_mistakes_from: no model.safetensors in {data.draft_mistakes_from!r}"
        )
    digest = weights_digest(data.draft_mistakes_from)
    meta = {
        "draft_sha256": digest,
        "problems": data.draft_mistake_problems,
        "data_seed": data.data_seed,
        "max_new_tokens": cfg.eval.max_new_tokens,
    }
    path = os.path.join(cfg.output_dir, "draft_mistakes.json")
    mistakes = load_mistakes(path, meta)
    if mistakes is None:
        draft = load_checkpoint(data.draft_mistakes_from, cfg.prompt)
        chosen = problems[: data.draft_mistake_problems]
        results = greedy_solve(
            draft.model,
            draft.builder,
            draft.processor,
            chosen,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
        outputs = [r["output"] for r in results]
        mistakes = mistakes_of(chosen, outputs, [r["finished"] for r in results])
        save_mistakes(path, mistakes, meta)
    print(f"{len(mistakes)} draft mistakes on {data.draft_mistake_problems} train problems")
    return mistakes


def initial_model(cfg: Config, mesh):
    """A random init (seed `seed`), or the weights of `train.init_from` to fine-tune."""
    if not cfg.train.init_from:
        return init_model(cfg.model, seed=cfg.seed, dtype=cfg.dtype, mesh=mesh)
    model = load_pretrained(
        cfg.train.init_from, dtype=cfg.dtype, mesh=mesh, scan_layers=cfg.model.text.scan_layers
    )
    if model.config != cfg.model:
        raise ValueError(
            f"train.init_from: the model in {cfg.train.init_from} is not the configured `model` "
            "(fine-tuning keeps the architecture and the token ids)"
        )
    return model


def run_sft(cfg: Config) -> dict:
    """Trains, evaluates and exports; returns the final metrics (also in <output_dir>/eval.json)."""
    origin = provenance()  # at the start: commits made while it trains are not what it ran
    tokenizer = load_tokenizer(cfg.data)
    builder = PromptBuilder.create(tokenizer, cfg.model, cfg.prompt)
    processor = make_image_processor(cfg.model.vision)
    problems = digitmath.generate_problems(
        "train", cfg.data.train_problems, cfg.data.data_seed, cfg.data.wording
    )
    mistakes = draft_mistakes(cfg, problems)
    dataset = sft_dataset(problems, builder, processor, cfg.data, cfg.data.data_seed, mistakes)
    mesh = mesh_from_config(cfg.mesh)
    model = initial_model(cfg, mesh)
    trainer = Trainer(cfg, model, dataset, cfg.output_dir, mesh)
    started = time.perf_counter()
    result = trainer.run(evaluate=lambda m: evaluate_model(cfg, m, builder, processor))
    metrics = {**result.metrics, "wall_s": time.perf_counter() - started, "step": result.step}
    return export_run(cfg, result.model, tokenizer, processor, {**metrics, **origin})


def export_run(cfg: Config, model, tokenizer, processor, metrics: dict) -> dict:
    """Exports the trained model to `export_dir` (default `<output_dir>/hf`) with the run's
    resolved config and `metrics` (+ `export_dir`), also written to `<output_dir>/eval.json`;
    returns those metrics."""
    export_dir = cfg.export_dir or os.path.join(cfg.output_dir, "hf")
    export_checkpoint(model, tokenizer, processor, export_dir)
    metrics = {**metrics, "export_dir": export_dir}
    if not is_primary():
        return metrics
    # The run's resolved config and results travel with the weights (provenance).
    save_config(cfg, os.path.join(export_dir, "dreamr_train_config.yaml"))
    for path in (
        os.path.join(cfg.output_dir, "eval.json"),
        os.path.join(export_dir, "dreamr_train.json"),
    ):
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics
