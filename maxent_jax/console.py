"""What a training run prints around its progress line: the config it runs, compile time, what next.

- At start, only the fields that differ from the defaults (docs/configuration.md), grouped by
  section: the full config is in WORKDIR/config.json, and 190 lines of YAML hide the few a user set.
- While training, `CompileClock` counts the seconds XLA spends compiling (or loading compiled
  programs from the cache), so the progress line can mark a step that compiled and keep it out
  of the ETA: the first step of a run otherwise predicts hours for a run of minutes.
- At the end, the commands that come next for this workdir (plot, evaluate), or how to resume.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import threading
from typing import Any, Mapping

import ml_collections

from maxent_jax import checkpoint_verify
from maxent_jax import export as export_lib
from maxent_jax.config import get_base_config
from maxent_jax.workdir import config_fields

# XLA compilation, and loading a compiled program from the persistent cache (jax.monitoring events).
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")


def changed_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Dotted field -> value for every field whose value is not the base default."""
    defaults = config_fields(get_base_config())
    return {k: v for k, v in config_fields(config).items() if k not in defaults or defaults[k] != v}


def describe_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
    """The start-of-run summary: changed fields, one line per section."""
    changed = changed_fields(config)
    if not changed:
        return f"config: the defaults (every field in {workdir / 'config.json'})"
    sections: dict[str, list[str]] = {}
    for field, value in changed.items():
        section, _, name = field.rpartition(".")
        sections.setdefault(section or "(top)", []).append(f"{name}={json.dumps(value)}")
    lines = [f"config: {len(changed)} fields differ from the defaults (every field in {workdir / 'config.json'})"]
    lines += [f"  {section}: {' '.join(items)}" for section, items in sections.items()]
    return "\n".join(lines)


class CompileClock:
    """Seconds spent compiling since the last `take()`, from jax.monitoring's duration events.

    One listener per process (jax offers no public way to remove one), shared by every clock user.
    """

    _lock = threading.Lock()
    _seconds = 0.0
    _installed = False

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            import jax

            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._installed = True

    @classmethod
    def _listen(cls, event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            with cls._lock:
                cls._seconds += duration

    @classmethod
    def take(cls) -> float:
        """Compile seconds accumulated since the previous call (and reset the count)."""
        with cls._lock:
            seconds, cls._seconds = cls._seconds, 0.0
        return seconds


def next_steps(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> str:
    """The commands a user runs after training: curves of the run and an evaluation of its policy.

    No --config for evaluate: a checkpoint inside the run is evaluated with the run's own
    config.json, overrides included, which a --config file would replace. A LoRA run's final_hf
    holds adapters only: its merged model is the one evaluate loads."""
    here = shlex.quote(str(workdir))
    if config.checkpoint.export_final:
        export = export_lib.MERGED_EXPORT_DIR if config.lora.enabled else export_lib.FINAL_EXPORT_DIR
        checkpoint = workdir / export
    else:
        steps = checkpoint_verify.list_steps(workdir / checkpoint_verify.CHECKPOINTS_DIR)
        checkpoint = workdir / checkpoint_verify.CHECKPOINTS_DIR / str(steps[-1]) if steps else None
    lines = ["next:", f"  python -m maxent_jax.plot {here}"]
    if checkpoint is not None:
        lines.append(f"  python -m maxent_jax.evaluate --checkpoint={shlex.quote(str(checkpoint))}")
    return "\n".join(lines)


def interrupted(step: int, workdir: pathlib.Path, workdir_given: bool) -> str:
    """The Ctrl-C line. Without --workdir the same command starts a new run in a fresh
    var/runs/<time>, so the line then names the flag that resumes this one."""
    flag = "" if workdir_given else f" with --workdir={shlex.quote(str(workdir))}"
    return f"interrupted at step {step}; saved; rerun the same command{flag} to resume"


def summary(record: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """`train/reward=0.9, ...` for the keys present in the last emitted record."""
    return ", ".join(f"{k}={record[k]:.4g}" for k in keys if isinstance(record.get(k), (int, float)))
