"""docs/parallelism.md's "How cost grows": per-device state and FLOPs per RL step on 8 devices,
for the shipped models (0.5B-8B) and completions of 1k-8k tokens.

    python -m maxent_jax.plan.growth            # rewrites the section between its markers

Each cell is the model's GRPO recipe with one step for all (`STEP`) and
`rollout.max_completion_length` changed, on mesh (1, 8, 1): the bytes each device holds for the run's whole life (parameters, AdamW moments,
the reference copy, the float32 gradient accumulator, from the rules' shardings exactly as
the planner and the trainer build them) and the model FLOPs of one RL step's update and
reference scoring (`core.analytic_flops`). Activations depend on the compiled program; the
per-recipe plans in docs/recipes.md have them. Cheap (no compile), so tests/test_plan_docs.py
recomputes the section and compares.
"""

from __future__ import annotations

import os
import pathlib

MODELS = ("qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_7b", "llama3_1_8b")
COMPLETIONS = (1024, 2048, 4096, 8192)
# One step for every model: 16 prompts (1 per device, 2 accumulation steps) x 16 completions, 1k-token prompts.
STEP = {"train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 2,
        "rollout.num_generations": 16, "rollout.max_prompt_length": 1024}
BEGIN, END = "<!-- growth:begin (python -m maxent_jax.plan.growth) -->", "<!-- growth:end -->"


def rows() -> list[tuple[str, int, int, float]]:
    """(model, completion tokens, state bytes per device, model FLOPs per RL step)."""
    from maxent_jax import cli, train
    from maxent_jax.parallel.mesh import make_mesh
    from maxent_jax.parallel.rules import resolve_rules
    from maxent_jax.plan import core, programs
    from maxent_jax.plan.architecture import model_config

    out = []
    for model in MODELS:
        fv, _ = cli.parse(train.define_flags, ["growth", f"--config=configs/{model}/grpo_math.py"])
        base = core.apply_overrides(train.resolve_config(fv), {"mesh.shape": (1, 8, 1), **STEP})
        cfg = model_config(base)
        setup = programs.build_setup(base, cfg, make_mesh((1, 8, 1)), resolve_rules(()))
        params = programs.per_device_bytes(setup.state.params)
        state = (2 * params + programs.per_device_bytes(setup.state.opt_state)
                 + 4 * programs.per_device_elements(setup.state.params))
        for completion in COMPLETIONS:
            config = core.apply_overrides(base, {"rollout.max_completion_length": completion})
            shapes = programs.step_shapes(config, (1, 8, 1))
            flops = (core.analytic_flops(cfg, shapes, training=True)
                     + core.analytic_flops(cfg, shapes, training=False))
            out.append((base.model.name_or_path, completion, state, flops))
    return out


def render() -> str:
    lines = [BEGIN, "", "| model | completion tokens | state per device | model FLOPs per RL step |", "|---|---|---|---|"]
    for model, completion, state, flops in rows():
        lines.append(f"| {model} | {completion} | {state / 1e9:.2f} GB | {flops:.2e} |")
    return "\n".join(lines + ["", END])


def rewrite(doc: pathlib.Path) -> None:
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + render() + text[end:])


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from maxent_jax.cli import REPO_ROOT

    rewrite(REPO_ROOT / "docs" / "parallelism.md")
