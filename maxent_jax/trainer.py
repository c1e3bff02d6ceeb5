"""The training loop: rollout -> rewards -> reference -> weights -> sharded step -> controllers.

Host code here only orchestrates; every number is computed by jitted functions from
`policy`, `objectives`, `controllers` and `parallel`. One RL step (spec 1.1):

1. the next prompts of the resumable stream (already rendered and tokenised);
2. G completions each from the in-process sampler (live parameters) or the rollout server;
3. rewards on the decoded text -> utilities `[P, G]`;
4. reference log-probs from the frozen reference parameters (or the rollout's);
5. MaxEnt weights or GRPO advantages (pure functions, before the step);
6. the jitted, sharded, donated update with accumulation over micro-batches of whole groups;
7. controllers, fed statistics of the whole accumulation window;
8. telemetry, evaluation, checkpoints, weight push.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from maxent_jax import checkpoint as checkpoint_lib
from maxent_jax import checkpoint_verify, run_state, step_prep, warmup
from maxent_jax import export as export_lib
from maxent_jax import optimizer as optimizer_lib
from maxent_jax.controllers.persistence import resume_controller_state, to_json, write_controller_state
from maxent_jax.controllers.settings import ControllerSettings
from maxent_jax.controllers.state import ControllerInputs, ControllerState
from maxent_jax.controllers.update import update_controllers
from maxent_jax.data.stream import BatchStream
from maxent_jax.errors import UserError
from maxent_jax.evaluate import evaluate_policy
from maxent_jax.model import lora as lora_lib
from maxent_jax.model import lora_io
from maxent_jax.objectives.registry import get_objective
from maxent_jax.parallel.mesh import make_mesh
from maxent_jax.parallel.distributed import read_scalars
from maxent_jax.parallel.rules import resolve_rules
from maxent_jax.parallel.train_step import TrainState, init_train_state, make_train_step
from maxent_jax.plan.guard import check_fits
from maxent_jax.policy import rl_loss
from maxent_jax.preemption import PreemptionGuard
from maxent_jax.rewards import RewardScorer
from maxent_jax.rollout import dynamic_sampling, groups, staleness, stragglers
from maxent_jax.rollout.producer import Producer, ReadyBatch, Rollout, WeightPusher, shut_down
from maxent_jax.rollout.step_metrics import rollout_metrics
from maxent_jax.storage import reporting_storage_faults
from maxent_jax.run_setup import Task, load_policy, load_reference_params, load_task, objective_settings
from maxent_jax.telemetry import Telemetry

CONTROLLER_FILE = "controller_state.json"


class Trainer:
    """Holds the run's state and runs its phases; `run()` is the whole training."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, *, config_path: str | None = None):
        config = lora_lib.run_config(config)
        self.config = config
        self.workdir = workdir
        c = config
        self.seeds = c.info_seed.num_seeds if c.info_seed.enabled else 0
        self.group = c.rollout.num_generations + self.seeds  # K: completions per prompt group
        self.seed_rng = np.random.default_rng([c.seed, 9])  # seeded seed ids (the reference's are not, Q20)
        self.mesh = make_mesh(tuple(c.mesh.shape))
        self.rules = resolve_rules(c.mesh.rules)
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        # Prompts this host samples per optimizer step: per_device x batch devices x accumulation,
        # split over host processes (each feeds its slice of the global batch).
        self.num_prompts = (c.train.per_device_train_batch_size * batch_devices
                            * c.train.gradient_accumulation_steps) // jax.process_count()
        check_fits(c, tuple(self.mesh.devices.shape))  # accelerators only: the planned peak vs the device's memory
        self.policy = load_policy(c, self.mesh, self.rules, workdir=workdir)
        self.task: Task = load_task(c, self.policy.tokenizer)
        self.stream = BatchStream(self.task.train, self.num_prompts, c.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count())
        steps_per_epoch = max(1, len(self.task.train) // (self.num_prompts * jax.process_count()))
        self.total_steps = optimizer_lib.total_steps(c.train.max_steps, steps_per_epoch, c.train.num_train_epochs)
        self.optimizer, schedule = optimizer_lib.make_optimizer(c.optim, self.total_steps)
        self.lr_at = jax.jit(schedule)  # the learning rate at a step: one dispatch, not an eager op per term
        self.warmup = optimizer_lib.warmup_steps(self.total_steps, c.optim.warmup_steps, c.optim.warmup_ratio)
        self.state: TrainState = init_train_state(self.policy.params, self.optimizer, self.mesh, self.rules)
        self.objective_settings = objective_settings(c)
        objective = get_objective("grpo" if c.objective.train_grpo_objective else "maxent")
        lora_dropout = c.lora.dropout if c.lora.enabled else 0.0  # only the policy's training forward drops
        self.rl_step = make_train_step(self.policy.graphdef, self.policy.rest, self.state, self.optimizer,
                                       rl_loss(objective, self.objective_settings, c.model.logprob_chunk_size,
                                               c.info_seed.pooling, c.model.score_prompt_once, lora_dropout),
                                       self.mesh, self.rules, gradient_chunks=c.train.gradient_chunks,
                                       rng_seed=c.seed if lora_dropout > 0 else None)
        self.score, self.packer, self.packed_score = step_prep.reference_programs(
            c, self.policy, self.state.params, self.mesh, self.rules, group=self.group, batch_devices=batch_devices)
        self.controller_settings = ControllerSettings.from_config(c, optimizer_warmup_steps=self.warmup)
        self.controllers: ControllerState = resume_controller_state(None, self.controller_settings)
        self.update_controllers = jax.jit(update_controllers)
        self.prepare_objective = step_prep.objective_prep(c)  # MaxEnt weights or GRPO advantages, compiled once
        # first_order / truncated_backprop differentiate the closed-form weights, so they need q.
        self.meta_needs_batch = (self.controller_settings.meta_enabled
                                 and self.controller_settings.meta_method != "analytic")
        self.reference_params = None  # set when RL starts: the policy after the supervised warm-up
        self.lora_base: dict[str, Any] | None = None  # LoRA: the frozen base's identity (path, revision, sha256)
        self.key = jax.random.key(c.seed)
        self.step = 0
        self.sft_done = c.train.sft_warmup_steps == 0
        self.checkpoints = checkpoint_lib.CheckpointManager(
            workdir, save_steps=c.checkpoint.save_steps, keep=c.checkpoint.save_total_limit,
            async_save=c.checkpoint.async_save)
        self.resume_point = checkpoint_verify.resolve_resume(c.checkpoint.resume, workdir)
        self.telemetry = Telemetry(workdir, c, is_main=jax.process_index() == 0, total_steps=self.total_steps,
                                   config_path=config_path,
                                   resume_step=self.resume_point.step if self.resume_point else 0)
        run_state.check_space(self)  # the checkpoints (and final export) this run will write fit on the disk
        self.consecutive_nonfinite = 0
        self.tokens_seen = 0
        self.applied_stream = self.stream.state()  # after the last APPLIED update's prompts: what a checkpoint records
        self.producer: Producer | None = None  # rollout.max_staleness >= 1 (start_producer)
        self.pusher: WeightPusher | None = None
        self.stopped_by: signal.Signals | None = None  # the signal that stopped run() early, if any
        r = c.rewards
        workers = r.num_workers or None  # config 0 = in-process
        self.rewards = RewardScorer(r.reward_funcs, r.reward_weights, num_workers=workers, item_timeout_s=r.timeout_s)
        self.eval_rewards = RewardScorer(r.eval_reward_funcs or r.reward_funcs,
                                         r.eval_reward_weights if r.eval_reward_funcs else r.reward_weights,
                                         num_workers=workers, item_timeout_s=r.timeout_s)

    def say(self, text: str) -> None:
        """A whole line on the console (main process), without garbling the progress line."""
        if jax.process_index() != 0:
            return
        if self.telemetry.progress is not None:
            self.telemetry.progress.message(text)
        else:
            print(text, flush=True)

    # -- rollout -----------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int) -> tuple[list[list[int]], list[list[float]], np.ndarray]:
        """n completions per prompt (prompt-major): token ids, behaviour log-probs, stopped flags."""
        self.key, key = jax.random.split(self.key)
        return self.policy.generate(self.state.params, prompt_ids, groups.sampling_params(self.config.rollout, n), key)

    def rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """G completions per prompt, plus one per seed prompt when InfoSeed is on (rollout/groups.py)."""
        return groups.rollout_groups(rows, config=self.config, policy=self.policy, prompt_len=self.task.prompt_len,
                                     generate=self.generate, rewards=self.rewards, seed_rng=self.seed_rng)

    # -- one RL step ---------------------------------------------------------------------

    def prepare(self, ro: Rollout, keep: np.ndarray) -> tuple[step_prep.Arrays, dict[str, float], ControllerInputs]:
        """Reference statistics and the objective's pre-step arrays of the groups `keep` (step_prep.py)."""
        return step_prep.prepare(ro, keep, config=self.config, group=self.group, packer=self.packer,
                                 reference_logprobs=self.reference_logprobs,
                                 prepare_objective=self.prepare_objective, controllers=self.controllers,
                                 meta_needs_batch=self.meta_needs_batch)

    def reference_logprobs(self, batch: dict[str, np.ndarray], packed: dict[str, np.ndarray]) -> np.ndarray:
        """`[P * G, Tc]` reference log-probs from the configured source (spec 5.3), on the packed
        buffers when `train.packing` (`packed`: the step's buffers and grouped completion mask)."""
        m = self.config.maxent
        source = "policy" if m.share_reference_model else m.reference_logprobs_source
        if source == "rollout":
            return batch["behaviour_logp"]
        return step_prep.reference_logprobs(
            batch, packed, self.state.params if source == "policy" else self.reference_params, score=self.score,
            packed_score=self.packed_score, micro_batches=self.config.train.gradient_accumulation_steps,
            mesh=self.mesh, rules=self.rules)

    def train_step(self) -> dict[str, float]:
        """One RL step: with `rollout.max_staleness` 0 push, collect and update in turn (synchronous);
        else update on the producer's next batch, collected while earlier updates ran."""
        if self.producer is not None:
            return self.update(self.producer.next())
        if self.policy.remote is not None:
            self.policy.remote.maybe_push(self._push_params(self.state.params), self.step)
        return self.update(self.collect(self.step))

    def collect(self, index: int) -> ReadyBatch:
        """The rollouts of batch `index` (the update after `index` applied ones): the next prompts of
        the stream, their completions and rewards, each completion's weight version; with
        `rollout.dynamic_sampling`, further rounds of prompts until the batch holds informative
        groups. The one per-batch call of the producer (rollout/producer.py)."""
        c = self.config
        rows = self.stream.next()
        ro, metrics = self._sampled(rows, index), {}
        if c.rollout.dynamic_sampling:  # keep informative groups, draw more prompts (rollout/dynamic_sampling.py)
            rows, ro, metrics = dynamic_sampling.fill_batch(
                (rows, ro), self.stream.next, lambda more: self._sampled(more, index),
                max_rounds=c.rollout.dynamic_sampling_max_rounds, micro_batches=c.train.gradient_accumulation_steps,
                pad_id=self.policy.pad_id)
        return ReadyBatch(rows=rows, rollout=ro, stream_state=self.stream.state(), metrics=metrics)

    def _sampled(self, rows: list[dict[str, Any]], index: int) -> Rollout:
        """`rollout(rows)` with the weight version that sampled each completion (the server reports
        it; the in-process sampler samples with the live weights of batch `index`)."""
        remote = self.policy.remote
        if remote is not None:
            remote.take_versions()  # forget this thread's other generations (the initial reward)
        ro = self.rollout(rows)
        if remote is None:
            versions = np.full(ro.lengths.shape, index)
        else:
            served, n = remote.take_versions(), len(rows) * self.config.rollout.num_generations
            versions = np.array(groups.interleave(served[:n], served[n:], n // len(rows), self.seeds)
                                if self.seeds else served)
        return dataclasses.replace(ro, versions=versions)

    def update(self, ready: ReadyBatch) -> dict[str, float]:
        """The reference, objective and update of one collected batch, its controllers and metrics.

        Groups sampled more than `rollout.max_staleness` steps ago are dropped (marked invalid)."""
        c, ro, rows = self.config, ready.rollout, ready.rows
        stale = staleness.staleness(ro.versions, self.step)
        keep = staleness.groups_to_keep(stale, self.group, c.rollout.max_staleness)
        arrays, stats, inputs = self.prepare(ro, keep)
        self.tokens_seen += int(ro.batch["attention_mask"].sum())
        if c.logging.log_completions:
            self._log_completions(rows, ro, arrays)
        # tau and beta as this step used them, read once (update_controllers replaces them below).
        used = read_scalars({"tau": self.controllers.tau, "beta": self.controllers.beta})
        used_tau, used_beta = used["tau"], used["beta"]
        batch = step_prep.micro_batched(arrays, c.train.gradient_accumulation_steps, self.mesh, self.rules)
        self.state, metrics = self.rl_step(self.state, batch, scalars={"beta": np.float32(used_beta)})
        metrics = read_scalars(metrics)
        skipped = bool(metrics.pop("skipped"))
        self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if skipped else 0
        if self.consecutive_nonfinite >= c.train.max_consecutive_nonfinite:
            raise UserError(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                f"(train.max_consecutive_nonfinite={c.train.max_consecutive_nonfinite}); lower optim.learning_rate "
                "or check the data")
        self.step += 1
        self.applied_stream = ready.stream_state
        if self.pusher is not None:  # a copy: the next update donates these buffers while the push reads
            self.pusher.submit(self._push_params(jax.tree.map(jnp.copy, self.state.params)), self.step)
        inputs = inputs.replace(kl=jnp.asarray(metrics.get("loss/kl", 0.0), jnp.float32))
        lr = float(self.lr_at(self.step - 1))  # what this step's update used
        lr_scale = optimizer_lib.lr_scale(lr, c.optim.learning_rate)
        self.controllers, controller_metrics = self.update_controllers(
            self.controllers, inputs, self.controller_settings, jnp.int32(self.step), jnp.float32(lr_scale))
        remote = self.policy.remote
        return {
            **{f"train/{k}": v for k, v in metrics.items()},
            **{f"train/{k}": v for k, v in stats.items()},
            **read_scalars(controller_metrics),
            **rollout_metrics(ro.utilities, ro.lengths, ro.reward_parts, c.rollout.max_completion_length,
                              self.tokens_seen, ro.seconds),
            **ready.metrics,
            "train/tau": used_tau,
            "train/beta": used_beta,
            "train/skipped_steps": float(skipped),
            "train/learning_rate": lr,
            "train/grpo_objective": float(c.objective.train_grpo_objective),
            **({f"train/{k}": float(v) for k, v in dict(remote.metrics).items()} if remote is not None else {}),
            **{f"train/{k}": v for k, v in staleness.staleness_metrics(stale, keep, self.group).items()},
        }

    def _push_params(self, params: Any) -> Any:
        """What a push sends: the parameters, or a LoRA run's decoder (adapters and base: the push
        sends the adapters alone where the server takes them, rollout/remote.py)."""
        if self.policy.lora is None:
            return params
        return nnx.merge(self.policy.graphdef, params, self.policy.rest)

    def _log_completions(self, rows: list[dict[str, Any]], ro: Rollout, arrays: dict[str, np.ndarray]) -> None:
        """The first completions of the step with their advantage (GRPO) or weight (MaxEnt) and rewards."""
        signal = arrays["advantages" if "advantages" in arrays else "weights"].reshape(-1)
        self.telemetry.log_completions(self.step + 1, [
            {"prompt": rows[i // self.group]["prompt"], "completion": ro.texts[i], "advantage": float(signal[i]),
             **{f"reward/{name}": float(values[i]) for name, values in ro.reward_parts.items()}}
            for i in range(min(4, len(ro.texts)))])

    # -- supervised warm-up --------------------------------------------------------------

    def measure_initial_reward(self) -> None:
        """The untrained policy's mean reward on one batch of the training prompts (reported in the
        first metrics record as train/initial_reward), so the run shows where it started."""
        rows = BatchStream(self.task.train, self.num_prompts, self.config.seed + 2).next()
        reward = float(self.rollout(rows).utilities.mean())
        self.telemetry.accumulate({"train/initial_reward": reward})
        self.say(f"mean reward before training: {reward:.3f}")

    def supervised_warmup(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Teach the answer format on the dataset's worked solutions before RL (warmup.py); False when
        `should_stop` ended it early (nothing saved: a rerun warms up again)."""
        params = warmup.supervised_warmup(self.config, self.policy, self.task, self.state.params, self.mesh,
                                          self.rules, rows_per_step=self.num_prompts * self.group, say=self.say,
                                          should_stop=should_stop)
        if params is None:
            return False
        self.state = init_train_state(params, self.optimizer, self.mesh, self.rules)  # RL's optimizer starts fresh
        self.sft_done = True
        return True

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """One completion per eval prompt, relaxed format (spec 10): mean reward and format failures."""
        c = self.config

        def generate(rows: Sequence[dict[str, Any]]) -> list[str]:
            ids, _, _ = self.generate([r["prompt_ids"] for r in rows], 1)
            return self.policy.decode(ids)

        return evaluate_policy(generate, self.task.eval[: c.eval.max_eval_samples or None],
                               lambda texts, answers: self.eval_rewards(texts, answers, is_eval=True)[0],
                               c.eval.per_device_eval_batch_size, process_index=jax.process_index(),
                               process_count=jax.process_count())

    # -- checkpoints ---------------------------------------------------------------------

    def save(self) -> None:
        self.checkpoints.save(self.step, run_state.checkpoint_state(self), run_state.extras(self))

    def restore(self, point: checkpoint_verify.ResumePoint) -> None:
        run_state.restore(self, point)  # arrays and host state (run_state.py)
        self.say(f"resumed from {point.path} at step {self.step}")

    # -- the whole run -------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        c = self.config
        last: dict[str, float] = {}
        with PreemptionGuard() as guard:
            if self.resume_point is not None:
                self.restore(self.resume_point)
            else:
                self.measure_initial_reward()
                warmed = not self.sft_done
                if warmed and not self.supervised_warmup(guard.should_stop):
                    self.stopped_by = guard.received or signal.SIGTERM
                    return last
                if self.policy.lora is not None:
                    self.lora_base = lora_io.settle_base(
                        self.policy.rest, self.policy.model_cfg, self.workdir, name_or_path=c.model.name_or_path,
                        revision=c.model.revision, tokenizer_dir=self.policy.tokenizer_dir, changed=warmed)
            if self.reference_params is None:
                self.reference_params = (
                    load_reference_params(c, self.mesh, self.rules) if c.maxent.reference_model_name_or_path
                    else jax.tree.map(jnp.copy, self.state.params))
            self.telemetry.steps_begin()
            self.start_producer()
            while self.step < self.total_steps:
                metrics = self.train_step()
                self.telemetry.accumulate(metrics)
                last = self.telemetry.step_end(self.step) or last
                stopping = guard.should_stop()  # a stop signal skips the eval: save and exit within the step
                if (not stopping and c.eval.do_eval and c.eval.eval_steps and self.step % c.eval.eval_steps == 0
                        and self.task.eval):
                    self.telemetry.log_eval(self.step, self.evaluate())
                with reporting_storage_faults(CONTROLLER_FILE):
                    write_controller_state(self.workdir / CONTROLLER_FILE, self.controllers, self.controller_settings)
                saved = self.checkpoints.due(self.step) or stopping
                if saved:
                    self.save()
                if stopping or guard.should_stop():  # asked again: a signal during that eval or save stops here too
                    if not saved:
                        self.save()
                    self.checkpoints.wait()
                    self.stopped_by = guard.received or signal.SIGTERM  # a peer host's signal
                    return last
            if self.checkpoints.save_steps > 0 and self.checkpoints.latest_step() != self.step:
                self.save()  # the last step is always saved, so a finished run never replays steps
            self.checkpoints.wait()
            self.export_final()
        return last

    def start_producer(self) -> None:
        """With `rollout.max_staleness` >= 1: push the weights being trained, then collect and push in
        the background (`rollout.producer`) until the last step's batch."""
        s, remote = self.config.rollout.max_staleness, self.policy.remote
        if s == 0:
            return
        remote.maybe_push(self._push_params(self.state.params), self.step)
        self.pusher = WeightPusher(remote.maybe_push, pushed=self.step)
        collect = self.collect
        if self.config.rollout.straggler_groups:  # first complete groups fill a batch (rollout/stragglers.py)
            collect = stragglers.collector_for(self)
        self.producer = Producer(collect, self.step, s, self.pusher, end=self.total_steps)

    def export_final(self) -> None:
        if self.config.checkpoint.export_final:
            self.say(export_lib.export_policy(self.policy, self.state.params, self.workdir, lora_base=self.lora_base,
                                              controller_state=to_json(self.controllers, self.controller_settings)))

    def close(self) -> None:
        shut_down(self.producer, self.pusher, self.policy.close)  # first: the spawned server's devices and port go back at once
        self.checkpoints.close()
        self.telemetry.close()
        self.rewards.close()
        self.eval_rewards.close()

