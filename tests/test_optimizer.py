"""The LR schedule matches spec 7.6 exactly, in optimizer steps."""

import math

import pytest

from maxent_jax.optimizer import learning_rate_schedule, lr_scale, total_steps, warmup_steps


def reference_lr(s, lr0, total, warmup, kind):
    if s < warmup:
        return lr0 * s / warmup
    d = max(total - warmup, 1)
    p = min(s - warmup, d) / d
    return {"cosine": 0.5 * lr0 * (1 + math.cos(math.pi * p)), "linear": lr0 * (1 - p)}.get(kind, lr0)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup"])
def test_schedule_matches_reference(kind):
    total, lr0 = 50, 3e-4
    warmup = warmup_steps(total, 0, 0.2)
    assert warmup == 10
    schedule = learning_rate_schedule(lr0, total, warmup, kind)
    for s in [0, 1, 5, 9, 10, 11, 25, 49, 50, 60]:
        assert float(schedule(s)) == pytest.approx(reference_lr(s, lr0, total, warmup, kind), rel=1e-5, abs=lr0 * 1e-6)
    assert float(schedule(0)) == 0.0  # the first update uses lr 0 during warm-up
    assert lr_scale(float(schedule(5)), lr0) == pytest.approx(0.5, rel=1e-6)


def test_warmup_steps_prefers_explicit_and_caps_at_total():
    assert warmup_steps(100, 7, 0.5) == 7
    assert warmup_steps(10, 20, 0.0) == 10


@pytest.mark.parametrize("kwargs", [{"min_lr_rate": 0.1}, {"min_lr": 3e-5}])
def test_cosine_with_min_lr_matches_transformers(kwargs):
    """HF's cosine_with_min_lr (what a TRL recipe's lr_scheduler_kwargs asks for), step by step."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    total, lr0, warmup = 40, 3e-4, 8
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
    hf = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=warmup, num_training_steps=total,
                       scheduler_specific_kwargs=kwargs)
    rate = kwargs.get("min_lr_rate", kwargs.get("min_lr", 0.0) / lr0)
    ours = learning_rate_schedule(lr0, total, warmup, "cosine_with_min_lr", rate)
    for s in range(total):
        assert float(ours(s)) == pytest.approx(hf.get_last_lr()[0], rel=1e-5, abs=1e-12), s
        opt.step()
        hf.step()


def test_total_steps_max_steps_minus_one_runs_the_epochs():
    assert total_steps(100, 30, 2) == 60
    assert total_steps(25, 30, 2) == 25
    assert total_steps(-1, 30, 3) == 90
