"""The "Plans" section of docs/recipes.md: every shipped recipe's plan on its default mesh.

    python -m maxent_jax.plan.recipes_doc --write [--only configs/qwen2_5_7b/maxent_math.py]

plans each recipe (`python -m maxent_jax.plan --extrapolate --json`: compiled at 2 and 3 layers
and extended to the model's depth, a few minutes per recipe on a 2-core CPU),
stores the JSON under docs/plans/ with a fingerprint of its inputs (the recipe's planned fields,
`planned_fields`, and the model's config.json), and rewrites the section between the markers of docs/recipes.md from the
stored JSONs. Without --write it only re-renders from the stored plans.

tests/test_plan_docs.py keeps it honest without compiling a 7B model in CI: the section must
equal the rendering of the stored plans, and every stored plan's fingerprint must equal the
fingerprint of the recipe as it is now (a changed recipe or config.json makes the test fail until
its plan is regenerated).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys

from typing import Any

import ml_collections

from maxent_jax import cli, train
from maxent_jax import config as config_lib
from maxent_jax.config import to_json_dict
from maxent_jax.plan import guard
from maxent_jax.plan.architecture import CONFIGS_DIR, config_json_path
from maxent_jax.workdir import flatten

REPO = cli.REPO_ROOT
DOC = REPO / "docs" / "recipes.md"
PLANS = REPO / "docs" / "plans"
BEGIN, END = "<!-- plans:begin (python -m maxent_jax.plan.recipes_doc) -->", "<!-- plans:end -->"


def recipes() -> list[str]:
    """configs/<model>/<objective>_math.py, relative to the repository."""
    return sorted(str(p.relative_to(REPO)) for p in CONFIGS_DIR.glob("*/*_math.py"))


def plan_path(recipe: str) -> pathlib.Path:
    return PLANS / (recipe.removeprefix("configs/").removesuffix(".py").replace("/", "__") + ".json")


# Fields that change no planned program: with the automatic buffer length every packed step stays
# within the padded layout the plan compiles (`packing.Packer.within_padded`, docs/packing.md). A
# fixed `train.pack_length` is not neutral, and stays in the fingerprint.
PLAN_NEUTRAL = ("train.packing",)


def planned_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields a plan is made from: those of the sections that shape the programs (`guard`'s, the
    same as the trainer's plan cache) whose values differ from `get_base_config()`'s defaults.

    Why not the whole resolved config: a field added anywhere, off by default, changed its JSON and
    made every stored plan stale although no program changed. A recipe's own settings (batch,
    lengths, mesh, remat, dtypes, gradient chunks) are all away from the defaults, so changing any of
    them, or setting one back to its default, still changes the fingerprint. Not seen: a changed
    default of a field the recipes leave alone (regenerate the plans after changing one).
    """
    defaults = flatten(to_json_dict(config_lib.get_base_config()))
    return {k: v for k, v in flatten(to_json_dict(config)).items()
            if k.split(".")[0] not in guard.NOT_PLANNED and k not in PLAN_NEUTRAL
            and (k not in defaults or defaults[k] != v)}


def fingerprint(recipe: str) -> str:
    """sha256 of what a recipe's plan depends on outside the code: its planned fields and config.json."""
    fv, _ = cli.parse(train.define_flags, ["plan", f"--config={recipe}"])
    config = train.resolve_config(fv)
    digest = hashlib.sha256(json.dumps(planned_fields(config), sort_keys=True).encode())
    if config.model.name_or_path:
        digest.update(config_json_path(config.model.name_or_path).read_bytes())
    return digest.hexdigest()


def generate(recipe: str) -> None:
    """Plan one recipe in a fresh process (8 host devices) and store its JSON with the fingerprint."""
    out = plan_path(recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "maxent_jax.plan", f"--config={recipe}", "--json", str(out), "--nofixes",
                           "--extrapolate"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode not in (0, 1):
        raise SystemExit(f"planning {recipe} failed (exit {proc.returncode})")
    data = json.loads(out.read_text())
    data["inputs_sha256"] = fingerprint(recipe)
    out.write_text(json.dumps(data, indent=2) + "\n")


def render() -> str:
    """The markdown between the markers, from the stored plans (GB = 10^9 bytes, per device)."""
    lines = [BEGIN, "",
             "| recipe | mesh | update peak | score peak | fits 80 GB | margin | FLOPs/step (compiled / model) |",
             "|---|---|---|---|---|---|---|"]
    missing = []
    for recipe in recipes():
        path = plan_path(recipe)
        if not path.exists():
            missing.append(recipe)
            continue
        p = json.loads(path.read_text())
        phases = p["phases"]
        update = phases.get("update", {})
        flops = (f"{update['flops']:.2e} / {update['model_flops']:.2e}" if update.get("flops") else "")
        lines.append(f"| `{recipe}` | {','.join(map(str, p['mesh']))} | {update.get('peak_bytes', 0) / 1e9:.1f} GB | "
                     f"{phases.get('score', {}).get('peak_bytes', 0) / 1e9:.1f} GB | {'yes' if p['fits'] else '**no**'} | "
                     f"{p['margin_bytes'] / 1e9:.1f} GB | {flops} |")
    lines.append("")
    if missing:
        lines.append("Not planned yet (run `python -m maxent_jax.plan.recipes_doc --write --only RECIPE`): "
                     + ", ".join(f"`{r}`" for r in missing) + ".")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def rewrite(doc: pathlib.Path = DOC) -> None:
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + render() + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="plan the recipes (slow), then rewrite the section")
    parser.add_argument("--only", action="append", default=[], help="plan only this recipe (repeatable)")
    args = parser.parse_args()
    if args.write:
        for recipe in args.only or recipes():
            generate(recipe)
    rewrite()


if __name__ == "__main__":
    main()
