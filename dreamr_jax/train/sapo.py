"""Stage `sapo`: the draft trained with reinforcement learning against the frozen target's judge.

Each update draws `sapo.prompts` train problems (a grain pipeline, so its position is checkpointed)
and samples G rollouts of each from the draft, all rows in one device loop (`rl.rollout`). The
frozen target gives every rollout step its CPN verdict in one tree-shaped pass (`rl.scoring`,
the engine's verification); the task's checkers give the answer's and each step's correctness.
Rewards (`rl.rewards`, by name and weight from `sapo.rewards`), group advantages
(`rl.advantages`) and the policy loss (`rl.losses`) feed one jitted update (`rl.update`), with
the KL taken to the SFT draft the stage starts from (`train.init_from`).

The length reward's L_ref, the length of the target's own greedy chain on a prompt, is computed
once per prompt and kept in the checkpoint with the draft's parameters, the optimizer state, the
data iterator's position, the RNG key and the step: a killed run started again with the same
command ends with the parameters of an uninterrupted one.

Reward hacking is what RL against a learned judge gets wrong, so every step logs what it looks
like: steps per rollout, steps cut at `max_step_tokens` (no delimiter), chains shorter than the
gold one (a jump to the answer), and the share of accepted steps that are wrong (the step checker
knows each step's value, `digitmath.is_correct_step`, at the gold step of the same index).
"""

from __future__ import annotations

import dataclasses
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from dreamr_jax.config.loader import save_config
from dreamr_jax.config.schema import Config
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.models.sampling import GREEDY, Sampling
from dreamr_jax.parallel.distributed import is_primary, to_host
from dreamr_jax.parallel.mesh import mesh_from_config
from dreamr_jax.provenance import provenance
from dreamr_jax.rl.registry import get
from dreamr_jax.rl.rewards import RewardInputs, total_reward
from dreamr_jax.rl.rollout import (
    Prompt,
    RolloutSpec,
    prompt_rows,
    rollout,
    token_logprobs,
)
from dreamr_jax.rl.scoring import score_steps
from dreamr_jax.rl.update import (
    UpdateConfig,
    init_optimizer_state,
    place_batch,
    sapo_update,
    update_batch,
)
from dreamr_jax.serve.checkpoints import LoadedModel, load_checkpoint, pair_alpha
from dreamr_jax.speculative.runner import ModelRunner
from dreamr_jax.train.metrics import MetricsWriter
from dreamr_jax.train.optim import learning_rate_schedule
from dreamr_jax.train.sft import evaluate_model, export_run
from dreamr_jax.train.trainer import (
    TrainResult,
    batch_pipeline,
    checkpoint_manager,
    finish_run,
    restore_checkpoint,
    save_checkpoint,
)


@dataclasses.dataclass(frozen=True)
class Judged:
    """What the host knows of each rollout after scoring (R = prompts * G rows).

    correct: `[R]` bool, the answer is right. step_wrong: `[R, max_steps]` bool, the step is not a
    correct wording of the gold step of its index (False outside the rollout's steps). cut:
    `[R, max_steps]` bool, the step ended at `max_step_tokens`, not at a delimiter or EOS.
    short: `[R]` bool, fewer steps than the gold chain."""

    correct: np.ndarray
    step_wrong: np.ndarray
    cut: np.ndarray
    short: np.ndarray


def judge_rollouts(problems, rollouts, step_texts, stop_ids, eos_ids) -> Judged:
    """Checks each rollout (host arrays of `Rollouts`) against its problem (row r: problem
    r // G); `step_texts[r]` are its decoded steps."""
    rows, max_steps = rollouts.step_mask.shape
    group = rows // len(problems)
    correct = np.zeros(rows, bool)
    step_wrong = np.zeros((rows, max_steps), bool)
    cut = np.zeros((rows, max_steps), bool)
    short = np.zeros(rows, bool)
    enders = np.asarray(stop_ids + eos_ids)
    for r in range(rows):
        problem, texts = problems[r // group], step_texts[r]
        correct[r] = digitmath.is_correct(
            digitmath.extract_answer("\n\n".join(texts)), problem.answer
        )
        short[r] = len(texts) < len(problem.steps)
        for i, text in enumerate(texts):
            step_wrong[r, i] = i >= len(problem.steps) or not digitmath.is_correct_step(
                problem, i, text
            )
            cut[r, i] = not np.isin(rollouts.tokens[r, rollouts.step_ends[r, i] - 1], enders)
    return Judged(correct, step_wrong, cut, short)


class SapoTrainer:
    """SAPO on the draft `draft` (its weights are the policy's start and the frozen reference)
    against the frozen `target`, under `cfg.train` (optimizer, steps, checkpoints) and `cfg.sapo`.

    workdir/: `checkpoints/` (orbax), `metrics/` (TensorBoard + metrics.jsonl), `config.yaml`.
    """

    def __init__(self, cfg: Config, draft: LoadedModel, target: LoadedModel, mesh=None):
        self.cfg, self.sapo, self.mesh = cfg, cfg.sapo, mesh
        self.draft, self.target = draft, target
        for kind, name in (
            ("advantage", self.sapo.advantage),
            ("policy_loss", self.sapo.policy_loss),
        ):
            get(kind, name)  # an unknown name fails here, with the known ones, before any work
        for name in self.sapo.rewards:
            get("reward", name)
        os.makedirs(cfg.output_dir, exist_ok=True)
        if is_primary():
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        delimiter = cfg.prompt.step_delimiter
        draft_runner = ModelRunner.create(draft.model, draft.tokenizer, delimiter)
        target_runner = ModelRunner.create(target.model, target.tokenizer, delimiter)
        sampling = Sampling(temperature=self.sapo.temperature)
        budget = (self.sapo.max_new_tokens, self.sapo.max_step_tokens)
        self.spec = RolloutSpec.of(draft_runner, *budget, sampling)
        self.reference_spec = RolloutSpec.of(target_runner, *budget, GREEDY)
        self.update_config = UpdateConfig(
            self.sapo.policy_loss, self.sapo.epsilon, self.sapo.beta, sampling, self.sapo.remat
        )
        self.alpha = pair_alpha(target.path, draft.path, self.sapo.alpha)
        self.graphdef, self.params = nnx.split(draft.model)
        # nnx graphs hash by value: every run in a process shares the compiled programs (a
        # runner's graph hashes by identity, so each load of a model would compile them anew).
        self.target_graphdef, self.target_state = nnx.split(target.model)
        # The update donates the policy's buffers: the reference needs its own.
        self.reference = jax.tree.map(jnp.copy, self.params)
        self.opt_state = _replicated_counters(init_optimizer_state(cfg.train, self.params), mesh)
        self.key = jax.random.key(cfg.seed)
        self.step = 0
        self.reference_lengths: dict[int, int] = {}  # train problem index -> L_ref
        indices = grain.MapDataset.range(cfg.data.train_problems)
        # Every process draws the same prompts: rollouts are gathered to every host, which
        # judges all of them alike, and the update splits the rows over the mesh.
        batches = batch_pipeline(
            indices, self.sapo.prompts, cfg.train.steps, cfg.seed, by_process=False
        )
        self.iterator = batches.to_iter_dataset().__iter__()
        self.manager = checkpoint_manager(cfg.output_dir, cfg.train.keep_checkpoints)
        self.schedule = learning_rate_schedule(cfg.train)

    # -------------------------------------------------------------------------- checkpoints

    def _train_state(self) -> dict:
        return {
            "params": self.params,
            "opt_state": self.opt_state,
            # On the host: a key on one device is a host-local array, which a multi-host
            # checkpoint cannot hold.
            "key": np.asarray(jax.random.key_data(self.key)),
            "step": np.asarray(self.step, np.int64),
        }

    def save(self) -> None:
        data = {
            "iterator": self.iterator.get_state(),
            "reference_lengths": {str(i): n for i, n in sorted(self.reference_lengths.items())},
        }
        save_checkpoint(self.manager, self.step, self._train_state(), data)

    def restore_latest(self) -> bool:
        restored = restore_checkpoint(self.manager, self._train_state())
        if restored is None:
            return False
        state, data = restored
        self.params, self.opt_state = state["params"], state["opt_state"]
        # From host memory: a key left on the device orbax restored it to would be committed
        # there, and jit refuses it next to parameters on a larger mesh.
        self.key = jax.random.wrap_key_data(np.asarray(state["key"]))
        self.step = int(state["step"])
        self.iterator.set_state(data["iterator"])
        self.reference_lengths = {int(i): n for i, n in data["reference_lengths"].items()}
        return True

    # ------------------------------------------------------------------------------- a step

    def _prompts(self, model: LoadedModel, problems, images) -> list[Prompt]:
        return [
            Prompt.of(model.builder, model.processor, p.question, [image])
            for p, image in zip(problems, images, strict=True)
        ]

    def _lengths_of_reference(self, indices, target_prompts) -> np.ndarray:
        """L_ref `[prompts]` of the batch: the target's greedy chain length, cut as rollouts are
        (all prompts of the batch at once when one is new, so shapes stay fixed)."""
        if any(int(i) not in self.reference_lengths for i in indices):
            rows = prompt_rows(self.target.model.config, target_prompts, 1)
            chains = rollout(
                self.target_graphdef,
                self.target_state,
                rows,
                jax.random.key(0),
                self.reference_spec,
            )
            for i, n in zip(indices, to_host(chains.lengths), strict=True):
                self.reference_lengths[int(i)] = int(n)
        return np.asarray([self.reference_lengths[int(i)] for i in indices], np.int32)

    def train_step(self, indices) -> dict:
        """One update on the train problems `indices` `[prompts]`; returns its metrics."""
        cfg, sapo, group = self.cfg, self.sapo, self.sapo.group_size
        problems = [
            digitmath.generate_problem("train", int(i), cfg.data.data_seed, cfg.data.wording)
            for i in indices
        ]
        images = [problem_image(p) for p in problems]  # rendered once for both models
        draft_rows = prompt_rows(
            self.draft.model.config, self._prompts(self.draft, problems, images), group
        )
        target_prompts = self._prompts(self.target, problems, images)
        target_rows = prompt_rows(self.target.model.config, target_prompts, group)
        self.key, key = jax.random.split(self.key)

        started = time.perf_counter()
        rollouts = rollout(self.graphdef, self.params, draft_rows, key, self.spec)
        rollouts = to_host(rollouts)
        rollout_s = time.perf_counter() - started

        started = time.perf_counter()
        scores = score_steps(
            self.target_graphdef, self.target_state, target_rows, rollouts, self.target.builder
        )
        scores = to_host(scores)
        reference_lengths = np.repeat(self._lengths_of_reference(indices, target_prompts), group)
        score_s = time.perf_counter() - started

        step_texts = self._step_texts(rollouts)
        judged = judge_rollouts(
            problems, rollouts, step_texts, self.spec.stop_ids, self.spec.eos_ids
        )
        # The engine accepts a step when p > alpha and the judge kept to the answer format.
        step_p = np.where(scores.mass >= sapo.format_floor, scores.p, 0.0).astype(np.float32)
        inputs = RewardInputs(
            correct=jnp.asarray(judged.correct),
            step_p=jnp.asarray(step_p),
            step_mask=jnp.asarray(rollouts.step_mask),
            step_own=jnp.asarray(scores.own),
            lengths=jnp.asarray(rollouts.lengths),
            reference_lengths=jnp.asarray(reference_lengths),
            alpha=jnp.float32(self.alpha),
        )
        rewards, terms = total_reward(inputs, sapo.rewards)
        advantages = get("advantage", sapo.advantage)(rewards, group)

        started = time.perf_counter()
        reference_logprobs = to_host(
            token_logprobs(
                self.graphdef,
                self.reference,
                draft_rows,
                rollouts.tokens,
                rollouts.completion_mask,
                self.spec.sampling,
            )
        )
        batch = update_batch(
            self.draft.model.config,
            draft_rows,
            rollouts.tokens,
            rollouts.completion_mask,
            rollouts.logprobs,
            reference_logprobs,
            advantages,
            sapo.micro_batches,
        )
        self.params, self.opt_state, update = sapo_update(
            self.graphdef,
            cfg.train,
            self.update_config,
            self.params,
            self.opt_state,
            place_batch(batch, self.mesh),
            mesh=self.mesh,
        )
        update = to_host(update)
        update_s = time.perf_counter() - started

        mask = rollouts.step_mask
        accepted = mask & (step_p > self.alpha)
        tokens = max(int(rollouts.completion_mask.sum()), 1)
        metrics = {
            "reward": float(np.mean(rewards)),
            **{f"reward_{name}": float(np.mean(term)) for name, term in terms.items()},
            "acceptance": float(accepted.sum() / max(mask.sum(), 1)),
            # What the engine keeps as written: accepted, or the target's own step verbatim.
            "kept": float((accepted | scores.own).sum() / max(mask.sum(), 1)),
            "own_steps": float(scores.own.sum() / max(mask.sum(), 1)),
            "accepted_wrong": float((accepted & judged.step_wrong).sum() / max(accepted.sum(), 1)),
            "wrong_steps": float(judged.step_wrong.sum() / max(mask.sum(), 1)),
            "cut_steps": float((judged.cut & mask).sum() / max(mask.sum(), 1)),
            "short_chains": float(judged.short.mean()),
            # Groups whose G rewards are all equal teach nothing (zero advantage).
            "flat_groups": float(
                np.mean(np.ptp(np.asarray(rewards).reshape(-1, group), axis=1) == 0)
            ),
            "steps_per_rollout": float(mask.sum(axis=1).mean()),
            "rollout_tokens": float(rollouts.lengths.mean()),
            # The sampled tokens' mean surprisal: an estimate of the sampling distribution's
            # per-token entropy (the full distributions are not kept).
            "entropy": float(-rollouts.logprobs.sum() / tokens),
            **{k: float(v) for k, v in update.items()},
            "learning_rate": float(self.schedule(self.step)),
            "rollout_s": rollout_s,
            "score_s": score_s,
            "update_s": update_s,
        }
        return metrics

    def _step_texts(self, rollouts) -> list[list[str]]:
        """Each row's steps as text, delimiters and surrounding space stripped."""
        builder = self.draft.builder
        texts = []
        for tokens, ends, mask in zip(
            rollouts.tokens, rollouts.step_ends, rollouts.step_mask, strict=True
        ):
            starts = np.concatenate([[0], ends[mask][:-1]])
            texts.append(
                [
                    builder.decode(tokens[a:b]).strip()
                    for a, b in zip(starts, ends[mask], strict=True)
                ]
            )
        return texts

    # --------------------------------------------------------------------------------- loop

    def run(self, *, stop_after: int | None = None, evaluate=None) -> TrainResult:
        """Trains up to `train.steps` (or `stop_after` steps, to simulate a kill), saving every
        `save_every` steps and at the end; evaluates the final draft if given."""
        tcfg = self.cfg.train
        resumed = self.restore_latest()
        writer = MetricsWriter(os.path.join(self.cfg.output_dir, "metrics"))
        last = tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)
        bar = tqdm(
            total=tcfg.steps, initial=self.step, desc="sapo", dynamic_ncols=True, disable=None
        )
        if resumed:
            bar.write(f"resumed from step {self.step}")
        metrics: dict = {}
        while self.step < last:
            metrics = self.train_step(next(self.iterator))
            self.step += 1
            bar.update(1)
            if metrics["skipped"]:
                bar.write(f"step {self.step}: non-finite loss or gradient, update skipped")
            if self.step % tcfg.log_every == 0 or self.step == last:
                writer.write(self.step, metrics)
                bar.set_postfix(
                    reward=f"{metrics['reward']:.3f}", accept=f"{metrics['acceptance']:.2f}"
                )
            if self.step % tcfg.save_every == 0 or self.step == tcfg.steps:
                self.save()
        bar.close()
        return finish_run(self, writer, metrics, evaluate)


def _replicated_counters(opt_state, mesh):
    """The optimizer state with its plain arrays (step counts; the moments are `nnx.Variable`s,
    sharded like the parameters) replicated over `mesh`, where the update returns them: a state
    restored into this layout comes back there, not committed to one device, which jit refuses
    next to parameters on the whole mesh."""
    if mesh is None:
        return opt_state
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        return leaf if isinstance(leaf, nnx.Variable) else jax.device_put(leaf, replicated)

    return jax.tree.map(place, opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sapo_trainer(cfg: Config) -> SapoTrainer:
    """The trainer of a `sapo` config: the draft of `train.init_from` and the frozen target of
    `sapo.target`, both on the configured mesh."""
    mesh = mesh_from_config(cfg.mesh)
    scan = cfg.model.text.scan_layers  # the target's layers run as the draft's do
    draft = load_checkpoint(
        cfg.train.init_from, cfg.prompt, dtype=cfg.dtype, mesh=mesh, scan_layers=scan
    )
    if draft.model.config != cfg.model:
        raise ValueError(
            f"train.init_from: the model in {cfg.train.init_from} is not the configured `model`"
        )
    # The judge on the same mesh, sharded by the same rules (a 32B target fits no one device).
    target = load_checkpoint(
        cfg.sapo.target, cfg.prompt, dtype=cfg.dtype, mesh=mesh, scan_layers=scan
    )
    return SapoTrainer(cfg, draft, target, mesh)


def run_sapo(cfg: Config, *, stop_after: int | None = None) -> dict:
    """Trains the draft of `train.init_from` with SAPO, evaluates it on the val split and exports
    it; returns the final metrics (also in <output_dir>/eval.json). With `stop_after`, stops
    there, as a killed run would, and exports nothing."""
    origin = provenance()  # at the start: commits made while it trains are not what it ran
    trainer = sapo_trainer(cfg)
    draft = trainer.draft
    started = time.perf_counter()
    result = trainer.run(
        stop_after=stop_after,
        evaluate=lambda m: evaluate_model(cfg, m, draft.builder, draft.processor),
    )
    metrics = {
        **result.metrics,
        "alpha": trainer.alpha,
        "wall_s": time.perf_counter() - started,
        "step": result.step,
    }
    if result.step < cfg.train.steps:
        return metrics
    return export_run(cfg, result.model, draft.tokenizer, draft.processor, {**metrics, **origin})
