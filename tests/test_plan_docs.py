"""docs/recipes.md's plan tables are the rendering of the stored plans, and every stored plan was
made from the recipe and config.json as they are now (no 7B compile in CI: the inputs are checked)."""

from __future__ import annotations

import json

import pytest

from maxent_jax.plan import recipes_doc


def test_the_plans_section_is_the_rendering_of_the_stored_plans():
    text = recipes_doc.DOC.read_text()
    start, end = text.index(recipes_doc.BEGIN), text.index(recipes_doc.END) + len(recipes_doc.END)
    assert text[start:end] == recipes_doc.render(), "run: python -m maxent_jax.plan.recipes_doc"


@pytest.mark.parametrize("recipe", [r for r in recipes_doc.recipes() if recipes_doc.plan_path(r).exists()])
def test_each_stored_plan_was_made_from_the_current_recipe(recipe):
    stored = json.loads(recipes_doc.plan_path(recipe).read_text())
    assert stored["inputs_sha256"] == recipes_doc.fingerprint(recipe), (
        f"{recipe} changed since its plan: python -m maxent_jax.plan.recipes_doc --write --only {recipe}")


def test_a_changed_recipe_makes_its_plan_stale(monkeypatch, tmp_path):
    recipe = "configs/qwen2_5_0_5b/grpo_math.py"
    before = recipes_doc.fingerprint(recipe)
    import configs.openr1_math as task

    original = task.task_config
    monkeypatch.setattr(task, "task_config", lambda name: _with(original(name), "rollout", "temperature", 0.5))
    assert recipes_doc.fingerprint(recipe) != before


def _with(config, section, field, value):
    config[section][field] = value
    return config


@pytest.mark.slow
def test_the_growth_section_of_parallelism_md_is_current():
    from maxent_jax.cli import REPO_ROOT
    from maxent_jax.plan import growth

    text = (REPO_ROOT / "docs" / "parallelism.md").read_text()
    start, end = text.index(growth.BEGIN), text.index(growth.END) + len(growth.END)
    assert text[start:end] == growth.render(), "run: python -m maxent_jax.plan.growth"
