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


RECIPE = "configs/qwen2_5_0_5b/grpo_math.py"


@pytest.mark.parametrize("section,field,value", [
    ("train", "per_device_train_batch_size", 4), ("train", "gradient_chunks", 2),
    ("rollout", "max_completion_length", 1024), ("mesh", "shape", (2, 4, 1)), ("model", "remat", False),
    ("model", "param_dtype", "float32")])
def test_a_changed_recipe_makes_its_plan_stale(monkeypatch, section, field, value):
    before = recipes_doc.fingerprint(RECIPE)
    import configs.qwen2_5_0_5b.base as base

    original = base.shared_config
    monkeypatch.setattr(base, "shared_config", lambda: _with(original(), section, field, value))
    assert recipes_doc.fingerprint(RECIPE) != before


def test_a_new_field_off_by_default_leaves_the_plans_current(monkeypatch):
    """Other work adds config fields all the time; one that is off by default changes no program."""
    before = recipes_doc.fingerprint(RECIPE)
    import configs.openr1_math as task
    from maxent_jax import config as config_lib

    original = config_lib.get_base_config

    def with_new_field():
        c = original()
        c.train.some_new_feature = False
        return c

    monkeypatch.setattr(config_lib, "get_base_config", with_new_field)
    monkeypatch.setattr(task, "get_base_config", with_new_field)
    assert recipes_doc.planned_fields(task.task_config("x"))  # the recipe's own settings are there...
    assert "train.some_new_feature" not in recipes_doc.planned_fields(with_new_field())  # ...a default is not
    assert recipes_doc.fingerprint(RECIPE) == before


def test_automatic_packing_leaves_the_plans_current_and_a_fixed_length_does_not(monkeypatch):
    """Automatic packing stays within the planned padded layout (`Packer.within_padded`); a fixed
    buffer length can outgrow it, so it is planned."""
    before = recipes_doc.fingerprint(RECIPE)
    import configs.qwen2_5_0_5b.base as base

    original = base.shared_config
    monkeypatch.setattr(base, "shared_config", lambda: _with(original(), "train", "packing", not original().train.packing))
    assert recipes_doc.fingerprint(RECIPE) == before
    monkeypatch.setattr(base, "shared_config", lambda: _with(_with(original(), "train", "packing", True), "train",
                                                             "pack_length", 8192))
    assert recipes_doc.fingerprint(RECIPE) != before


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
