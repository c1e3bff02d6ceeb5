"""Which peer needs what, and the one shared step of every torch peer: our weights as an HF directory.

Torch, transformers and TRL are imported only by the `--vs` paths; a missing one is a one-line
error (exit 2) that says how to install it. The vLLM peer runs in its own environment.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from maxent_jax.errors import UserError

PEER_PACKAGES = {"transformers": ("torch", "transformers"), "trl": ("torch", "transformers", "trl", "datasets")}
VLLM_ENV = ".venv-vllm"


def require(peer: str) -> None:
    """UserError naming the missing packages of `--vs peer` and the command that installs them."""
    missing = [p for p in PEER_PACKAGES[peer] if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"--vs {peer} needs {', '.join(PEER_PACKAGES[peer])} (missing: {', '.join(missing)}); "
                        "install the dev extras with `make setup` (pip install -e '.[dev]' -c constraints.txt)")


def vllm_python(explicit: str | None) -> Path:
    """The vLLM environment's interpreter: --vllm-python, $VLLM_PYTHON, or .venv-vllm in the repo."""
    from maxent_jax.cli import REPO_ROOT

    path = Path(explicit or os.environ.get("VLLM_PYTHON") or REPO_ROOT / VLLM_ENV / "bin" / "python")
    if not path.is_file():
        raise UserError(f"--vs vllm needs the vLLM environment's python ({path} not found); build it with "
                        "`make vllm-env`, or pass --vllm-python PATH")
    return path


def export_for_peers(model, cfg, out_dir: Path, *, tokenizer_dir: str | Path | None = None) -> Path:
    """Our weights (and a tokenizer directory's files) as an HF directory that transformers/vLLM load.

    Without `tokenizer_dir` the offline tokenizer (vocabulary 512) is built next to `out_dir`:
    vLLM needs a tokenizer even when prompts are token ids.
    """
    from maxent_jax.model.hf_io import export_hf_checkpoint

    if tokenizer_dir is None:
        from maxent_jax.data.tokenizer import build_offline_tokenizer

        tokenizer_dir = build_offline_tokenizer(out_dir.parent / "tokenizer")
    return export_hf_checkpoint(model, cfg, out_dir, tokenizer_dir=tokenizer_dir)
