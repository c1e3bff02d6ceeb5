"""Dynamic sampling (`rollout.dynamic_sampling`, maxent_jax/rollout/dynamic_sampling.py).

The filter and the batch filler on hand-made rollouts; the claim that a group marked invalid
changes no loss, gradient or metric of any objective; and a real tiny training step that drops,
redraws and masks groups.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maxent_jax.objectives import InfoSeedSettings, ObjectiveSettings, get_objective
from maxent_jax.objectives.grpo import prepare_grpo_batch
from maxent_jax.objectives.maxent import prepare_maxent_batch
from maxent_jax.rollout.dynamic_sampling import fill_batch, informative_groups, merge_rollouts, spread_slots
from maxent_jax.rollout.producer import Rollout

PAD = 99


def _rollout(utilities, width: int, tag: int) -> Rollout:
    """A rollout of P groups of K rows; row r of this rollout carries id `tag * 1000 + r` in its tokens."""
    u = np.asarray(utilities, np.float32)
    p, k = u.shape
    n = p * k
    ids = np.full((n, 2 + width), PAD, np.int32)
    ids[:, :2] = 1
    ids[:, 2] = tag * 1000 + np.arange(n)
    mask = np.zeros((n, width), bool)
    mask[:, 0] = True
    batch = {"input_ids": ids, "positions": np.zeros_like(ids), "attention_mask": ids != PAD,
             "completion_ids": ids[:, 2:].copy(), "completion_mask": mask,
             "behaviour_logp": np.where(mask, -1.0, 0.0).astype(np.float32),
             "seed_ids": np.tile(np.arange(k) - 2, p), "is_seed_aug": np.tile(np.arange(k) >= 2, p)}
    return Rollout(batch=batch, utilities=u, reward_parts={"acc": u.reshape(-1)},
                   texts=[f"{tag}:{r}" for r in range(n)], lengths=np.ones(n, int), seconds=1.0)


def _draws(rounds):
    """`next_rows` and `rollout` callables replaying the given utilities, one round per call."""
    it = iter(enumerate(rounds))

    def next_rows():
        tag, u = next(it)
        return [{"round": tag, "group": g, "utilities": u, "width": 8 * (tag + 1)} for g in range(len(u))]

    def rollout(rows):
        return _rollout(rows[0]["utilities"], rows[0]["width"], rows[0]["round"])

    return next_rows, rollout


def _fill(rounds, max_rounds, micro_batches=1):
    next_rows, rollout = _draws(rounds)
    rows = next_rows()
    return fill_batch((rows, rollout(rows)), next_rows, rollout, max_rounds=max_rounds,
                      micro_batches=micro_batches, pad_id=PAD)


@pytest.mark.parametrize("field, value", [("rollout.dynamic_sampling", "yes"),
                                          ("rollout.dynamic_sampling_max_rounds", 0)])
def test_bad_settings_are_one_line_naming_the_field(field, value):
    from maxent_jax import config as config_lib, config_check
    from maxent_jax.errors import UserError

    config = config_lib.get_base_config()
    section, leaf = field.split(".")
    with config[section].ignore_type():
        config[section][leaf] = value
    with pytest.raises(UserError, match=rf"{field}={value!r}.*(True or False|>= 1)") as err:
        config_check.validate(config)
    assert "\n" not in str(err.value)


def test_informative_means_rewards_not_all_equal():
    u = np.array([[1, 1, 1, 1], [0, 0, 0, 1], [0.5, 0.5, 0.5, 0.5 + 1e-9], [0.3, 0.2, 0.3, 0.3]])
    assert informative_groups(u).tolist() == [False, True, False, True]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(1, 6), st.data())
def test_spread_slots_gives_each_micro_batch_its_share(micro, per, data):
    slots_n = micro * per
    real = data.draw(st.integers(0, slots_n))
    slots = spread_slots(real, slots_n, micro)
    assert len(set(slots.tolist())) == real and all(0 <= s < slots_n for s in slots)
    counts = np.bincount(slots // per, minlength=micro)
    assert counts.max() - counts.min() <= 1


def test_a_batch_is_refilled_from_later_rounds_in_draw_order():
    # 4 groups of K=4 (2 originals + 2 seed rows): round 0 keeps groups 1, 3; round 1 has three
    # informative groups, of which the first two fill the batch; round 2 is never drawn.
    r0 = [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]
    r1 = [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1]]
    rows, ro, metrics = _fill([r0, r1, r0], max_rounds=5)
    assert [(r["round"], r["group"]) for r in rows] == [(0, 1), (0, 3), (1, 0), (1, 2)]
    assert ro.valid.all() and ro.valid.shape == (4, 4)
    np.testing.assert_array_equal(ro.utilities, np.array([r0[1], r0[3], r1[0], r1[2]], np.float32))
    # every row of a group comes along, in order: token ids name (round, row)
    want = [t * 1000 + g * 4 + j for t, g in [(0, 1), (0, 3), (1, 0), (1, 2)] for j in range(4)]
    assert ro.batch["input_ids"][:, 2].tolist() == want
    assert ro.texts == [f"{x // 1000}:{x % 1000}" for x in want]
    assert ro.batch["seed_ids"].tolist() == [-2, -1, 0, 1] * 4
    # round 1 bucketed its completions to 16 columns, round 0 to 8: re-padded on the right
    assert ro.batch["completion_ids"].shape == (16, 16) and ro.batch["input_ids"].shape == (16, 18)
    assert (ro.batch["completion_ids"][:8, 8:] == PAD).all() and not ro.batch["completion_mask"][:, 1:].any()
    assert ro.seconds == 2.0
    assert metrics == {"train/dynamic_sampling/rounds": 2.0, "train/dynamic_sampling/groups_dropped": 3.0,
                       "train/dynamic_sampling/groups_short": 0.0, "train/dynamic_sampling/informative_frac": 5 / 8,
                       "train/dynamic_sampling/sampled_reward": pytest.approx(np.mean([r0, r1]))}


def test_the_surplus_of_the_last_round_is_not_trained_on():
    r0 = [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    r1 = [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1]]
    rows, ro, metrics = _fill([r0, r1], max_rounds=5)
    assert [(r["round"], r["group"]) for r in rows] == [(0, 1), (1, 0), (1, 1), (1, 2)]
    assert metrics["train/dynamic_sampling/informative_frac"] == 5 / 8


def test_rounds_run_out_and_the_rest_of_the_batch_is_masked_dropped_groups():
    same = [[1, 1, 1, 1]] * 4
    r1 = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    rows, ro, metrics = _fill([same, r1, same], max_rounds=2, micro_batches=2)
    # one informative group; spread to micro-batch 0; the three filler slots are groups dropped this
    # step, each used once, none of them the kept one
    picked = [(r["round"], r["group"]) for r in rows]
    assert picked[0] == (1, 2) and ro.valid[0].all() and not ro.valid[1:].any()
    assert len(set(picked)) == 4 and all(informative_groups(ro.utilities) == ro.valid[:, 0])
    assert metrics["train/dynamic_sampling/rounds"] == 2.0
    assert metrics["train/dynamic_sampling/groups_short"] == 3.0
    assert metrics["train/dynamic_sampling/groups_dropped"] == 7.0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.sampled_from([(4, 1), (4, 2), (6, 3), (8, 4)]), st.integers(1, 4), st.data())
def test_any_rounds_give_a_full_batch_of_whole_distinct_groups(shape, max_rounds, data):
    p, micro = shape
    rounds = [data.draw(st.lists(st.lists(st.integers(0, 1), min_size=4, max_size=4), min_size=p, max_size=p))
              for _ in range(max_rounds)]
    rows, ro, metrics = _fill(rounds, max_rounds, micro)
    picked = [(r["round"], r["group"]) for r in rows]
    used = int(metrics["train/dynamic_sampling/rounds"])
    informative = [(t, g) for t in range(used) for g in range(p) if len(set(rounds[t][g])) > 1]
    real = [x for x, v in zip(picked, ro.valid[:, 0]) if v]
    assert len(rows) == p and len(set(picked)) == p  # full, never a group twice
    assert sorted(real) == informative[:p]  # the first informative groups in draw order (spread over slots)
    assert (ro.valid.all(-1) == ro.valid.any(-1)).all()  # a group is valid or invalid as a whole
    assert metrics["train/dynamic_sampling/groups_short"] == p - len(real)
    assert used == max_rounds or len(informative) >= p
    counts = np.bincount(np.flatnonzero(ro.valid[:, 0]) // (p // micro), minlength=micro)
    assert counts.max() - counts.min() <= 1
    # each slot's rows, utilities and tokens are its group's
    for slot, (t, g) in enumerate(picked):
        np.testing.assert_array_equal(ro.utilities[slot], rounds[t][g])
        assert ro.batch["input_ids"][slot * 4:(slot + 1) * 4, 2].tolist() == [t * 1000 + g * 4 + j for j in range(4)]


def test_one_round_that_is_already_full_draws_nothing_more():
    full = [[0, 1, 0, 0]] * 4
    rows, ro, metrics = _fill([full, full], max_rounds=3)
    assert metrics["train/dynamic_sampling/rounds"] == 1.0 and {r["round"] for r in rows} == {0}


def test_merge_keeps_every_array_per_row():
    a, b = _rollout([[0, 1, 2, 3]], 8, 0), _rollout([[4, 5, 6, 7]], 24, 1)
    merged = merge_rollouts([a, b], [(1, 0), (0, 0)], PAD)
    assert merged.batch["behaviour_logp"].shape == (8, 24)
    assert merged.reward_parts["acc"].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert merged.lengths.shape == (8,)


# -- a masked group changes nothing ------------------------------------------------------------

P, G, T, H = 3, 4, 5, 6
FILLER_AT = (1, 4)  # the padded batch: real 0, filler, real 1, real 2, filler


def _objective_batch(rng, p):
    return {
        "token_mask": jnp.asarray(np.arange(T)[None, None] < rng.integers(1, T + 1, (p, G, 1))),
        "ref_logp": jnp.asarray(rng.normal(-1.5, 0.3, (p, G, T)), jnp.float32),
        "behaviour_logp": jnp.asarray(rng.normal(-1.5, 0.3, (p, G, T)), jnp.float32),
        "seed_ids": jnp.asarray(np.tile([-1, -1, 0, 1], (p, 1))),
        "is_seed_aug": jnp.asarray(np.tile([False, False, True, True], (p, 1))),
    }


def _pad(real, filler):
    order = [0, None, 1, 2, None]
    fill = iter(range(len(FILLER_AT)))
    return jnp.stack([real[i] if i is not None else filler[next(fill)] for i in order])


OBJECTIVES = {
    "grpo-reference": ("grpo", dict()),
    "grpo-grpo-token": ("grpo", dict(loss_type="grpo", importance_sampling_level="token")),
    "grpo-bnpo-token-k3": ("grpo", dict(loss_type="bnpo", importance_sampling_level="token", kl_estimator="k3")),
    "grpo-dr_grpo": ("grpo", dict(loss_type="dr_grpo", importance_sampling_level="token", max_completion_length=T)),
    "grpo-dapo-corrected": ("grpo", dict(loss_type="dapo", importance_sampling_level="token",
                                         sampler_correction="token_truncate")),
    "maxent": ("maxent", dict()),
    "maxent-gspo": ("maxent", dict(importance_sampling_level="sequence", clip_adv_baseline=0.1)),
    "maxent-infoseed": ("maxent", dict(info_seed=InfoSeedSettings(num_seeds=2, lambda_=0.5, alpha_entropy=0.3))),
    "grpo-infoseed": ("grpo", dict(info_seed=InfoSeedSettings(num_seeds=2, lambda_=0.5, alpha_entropy=0.3))),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_filler_groups_change_no_loss_gradient_or_metric(name):
    """A micro-batch with 3 real groups and 2 invalid filler groups (holding arbitrary data) gives the
    loss, gradients and metrics of the 3 real groups alone: advantages/weights, every loss type's
    normaliser, KL (beta > 0), the clip term and InfoSeed's terms skip invalid groups."""
    kind, kw = OBJECTIVES[name]
    settings_ = ObjectiveSettings(**kw)
    rng = np.random.default_rng(0)
    real, filler = _objective_batch(rng, P), _objective_batch(rng, len(FILLER_AT))
    u_real = jnp.asarray(rng.integers(0, 3, (P, G)), jnp.float32)
    u_fill = jnp.asarray(rng.integers(0, 3, (len(FILLER_AT), G)), jnp.float32)
    logp_real = jnp.asarray(rng.normal(-1.5, 0.3, (P, G, T)), jnp.float32)
    logp_fill = jnp.asarray(rng.normal(-9.0, 3.0, (len(FILLER_AT), G, T)), jnp.float32)
    hidden_real = jnp.asarray(rng.normal(size=(P, G, H)), jnp.float32)
    hidden_fill = jnp.asarray(rng.normal(size=(len(FILLER_AT), G, H)), jnp.float32)
    padded = {k: _pad(real[k], filler[k]) for k in real}
    valid_real = jnp.ones((P, G), bool)
    valid_padded = _pad(valid_real, jnp.zeros((len(FILLER_AT), G), bool))

    def run(batch, u, valid, logp, hidden):
        if kind == "grpo":
            signal, _ = prepare_grpo_batch(u, valid, scale_rewards="group")
            extra = {"advantages": signal}
        else:
            ref_sum = jnp.sum(jnp.where(batch["token_mask"], batch["ref_logp"], 0.0), -1)
            signal, _ = prepare_maxent_batch(u, valid, ref_sum, batch["token_mask"].sum(-1), 0.3, 0.05,
                                             q_temperature=1.0, q_epsilon=1e-3)
            extra = {"weights": signal}
        fn = functools.partial(get_objective(kind), settings=settings_)
        full = {**batch, **extra, "valid": valid}
        loss_fn = lambda x, h: fn(x, {**full, "seed_hidden": h}, {"beta": 0.1})  # noqa: E731
        (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(logp, hidden)
        return loss, metrics, grads

    loss_a, metrics_a, (g_logp_a, g_h_a) = jax.jit(run)(real, u_real, valid_real, logp_real, hidden_real)
    loss_b, metrics_b, (g_logp_b, g_h_b) = jax.jit(run)(padded, _pad(u_real, u_fill), valid_padded,
                                                        _pad(logp_real, logp_fill), _pad(hidden_real, hidden_fill))
    assert float(loss_a) != 0.0
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    keep = np.array([0, 2, 3])
    np.testing.assert_allclose(np.asarray(g_logp_b)[keep], g_logp_a, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(g_h_b)[keep], g_h_a, rtol=1e-5, atol=1e-8)
    assert not np.asarray(g_logp_b)[list(FILLER_AT)].any() and not np.asarray(g_h_b)[list(FILLER_AT)].any()
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=1e-5, atol=1e-7, err_msg=key)


# -- the trainer --------------------------------------------------------------------------------

@pytest.mark.slow  # ~35 s of CPU (100 s wall at load 10): a Trainer on 8 devices, 6 rounds of generation
def test_a_training_step_drops_redraws_and_masks(tmp_path):
    """Tiny default, GRPO, 8 prompts x 4 per step, 8 CPU devices. Rewards are replaced by a pattern
    over the groups drawn (group n informative iff n % 3 == 0 in step 1, n % 8 == 0 after), so step 1
    fills its 8 groups in 3 rounds and step 2 runs out of rounds with 3 informative groups."""
    from tests.test_train_e2e import tiny_config  # the suite's short tiny config

    from maxent_jax.trainer import Trainer

    config = tiny_config(**{"train.sft_warmup_steps": 0, "rollout.dynamic_sampling": True,
                            "rollout.dynamic_sampling_max_rounds": 3, "objective.train_grpo_objective": True,
                            "rollout.max_completion_length": 8})
    trainer = Trainer(config, tmp_path)
    try:
        drawn, seen = [0], []
        real_rollout, real_prepare = trainer.rollout, trainer.prepare

        def patterned(rows):
            ro = real_rollout(rows)
            n = drawn[0] + np.arange(len(rows))
            drawn[0] += len(rows)
            keep = np.where(n < 24, n % 3 == 0, n % 8 == 0)
            u = np.where(keep[:, None], np.arange(ro.utilities.shape[1]) % 2, 1.0).astype(np.float32)
            return dataclasses.replace(ro, utilities=u)

        def prepare(ro, keep):
            arrays, stats, inputs = real_prepare(ro, keep)
            seen.append((ro, arrays["valid"]))
            return arrays, stats, inputs

        trainer.rollout, trainer.prepare = patterned, prepare
        trainer.reference_params = jax.tree.map(jnp.copy, trainer.state.params)
        step1 = trainer.train_step()
        assert trainer.stream.position.offset == 24  # three rounds of 8 prompts consumed
        step2 = trainer.train_step()
        assert trainer.stream.position.offset == 48
    finally:
        trainer.close()
    assert trainer.num_prompts == 8
    assert {k: step1[f"train/dynamic_sampling/{k}"] for k in ("rounds", "groups_dropped", "groups_short")} == {
        "rounds": 3.0, "groups_dropped": 16.0, "groups_short": 0.0}
    assert step1["train/dynamic_sampling/informative_frac"] == pytest.approx(1 / 3)
    assert seen[0][1].all() and (np.ptp(seen[0][0].utilities, -1) > 0).all()
    assert {k: step2[f"train/dynamic_sampling/{k}"] for k in ("rounds", "groups_dropped", "groups_short")} == {
        "rounds": 3.0, "groups_dropped": 21.0, "groups_short": 5.0}
    # the step's batch (what the objective and the update see) masks the 5 filler groups
    valid = seen[1][1]
    assert valid.shape == (8, 4) and valid.any(-1).sum() == 3 and (valid.all(-1) == valid.any(-1)).all()
    assert (np.ptp(seen[1][0].utilities, -1) > 0).sum() == 3
    # the trained batch is what the reward stats describe: 3 informative groups, reward 0.5 each
    assert step2["train/reward"] == pytest.approx((3 * 0.5 + 5 * 1.0) / 8)
    for step in (step1, step2):
        assert np.isfinite(step["train/loss"]) and step["train/skipped_steps"] == 0.0
