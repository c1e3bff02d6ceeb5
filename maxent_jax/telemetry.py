"""What a run reports: WORKDIR/metrics.jsonl, Weights & Biases, and a console progress line.

Cadence and aggregation follow spec 12.3: the loop hands every micro-step's (or step's)
numbers to `accumulate`, calls `step_end(step)` after each optimizer step, and every
`logging_steps` steps one record is emitted whose values are the averages of each numeric
metric over everything accumulated since the previous emission. Eval metrics are logged
too, to the same places (the reference drops them from W&B, Q24).

metrics.jsonl holds one JSON object per emission with `step`, `time` (Unix seconds) and the
spec 12.4 names; it is flushed and fsynced per line, so a crash loses nothing already
emitted. Non-finite values are written as null (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time
import uuid
from typing import Any, Mapping, Sequence, TextIO

import ml_collections

from maxent_jax.config import to_json_dict
from maxent_jax.console import CompileClock
from maxent_jax.errors import StorageFault
from maxent_jax.storage import storage_problem

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
DEFAULT_WANDB_PROJECT = "maxent-jax"
_REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Run header and W&B mode


def git_sha(env: Mapping[str, str] = os.environ) -> str:
    """MAXENT_GIT_SHA, else the short HEAD of the source checkout, else 'unknown' (spec 12.1)."""
    if env.get("MAXENT_GIT_SHA"):
        return env["MAXENT_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_header(config_path: str | None, recipe_path: str | None = None) -> dict[str, str]:
    return {
        "run/git_sha": git_sha(),
        "run/config_path": config_path or "unknown",
        "run/recipe_path": recipe_path or "unknown",
    }


def wandb_mode(setting: str, project: str, env: Mapping[str, str], *, has_api_key: bool) -> str:
    """'online', 'offline' or 'disabled' for `config.logging.wandb` = `setting`.

    WANDB_MODE=disabled or WANDB_DISABLED=true always wins (tests set it). An explicit
    'online'/'offline'/'disabled' is obeyed. 'auto' follows WANDB_MODE when set, else goes
    online when a project is named (config or WANDB_PROJECT) and an API key is available,
    else offline (a local run directory that `wandb sync` can upload later).
    """
    if env.get("WANDB_MODE") == "disabled" or env.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return "disabled"
    if setting != "auto":
        return setting
    if env.get("WANDB_MODE") in ("online", "offline"):
        return env["WANDB_MODE"]
    if (project or env.get("WANDB_PROJECT")) and has_api_key:
        return "online"
    return "offline"


def _has_wandb_api_key(env: Mapping[str, str]) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    netrc = pathlib.Path(env.get("NETRC", pathlib.Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# Window averaging


def _as_number(value: Any) -> float | None:
    """A Python float for numbers, bools, numpy/jax scalars; None for anything else."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        if getattr(value, "shape", ()) != ():
            return None
        return float(value)
    except (TypeError, ValueError):
        return None


class MetricWindow:
    """Running mean of every numeric metric since the last `pop()` (spec 12.3).

    A key that appears in only some micro-steps is averaged over those. Non-numeric values
    (strings) keep their last value.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._last: dict[str, Any] = {}

    def add(self, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            number = _as_number(value)
            if number is None:
                self._last[key] = value
            else:
                self._sums[key] = self._sums.get(key, 0.0) + number
                self._counts[key] = self._counts.get(key, 0) + 1

    def state(self) -> dict[str, Any]:
        """The metrics accumulated since the last emitted record, as JSON (kept in checkpoints, so a
        resumed run's next record averages the same steps as the uninterrupted run's)."""
        # A non-finite sum (a NaN loss in the window) is kept as its repr: JSON has no NaN.
        sums = {k: v if math.isfinite(v) else repr(v) for k, v in self._sums.items()}
        return {"sums": sums, "counts": dict(self._counts), "last": {k: _json_safe(v) for k, v in self._last.items()}}

    def restore(self, state: Mapping[str, Any]) -> None:
        self._sums = {k: float(v) for k, v in state["sums"].items()}
        self._counts = {k: int(v) for k, v in state["counts"].items()}
        self._last = dict(state["last"])

    def pop(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._last)
        out.update({k: self._sums[k] / self._counts[k] for k in self._sums})
        self.__init__()
        return out


def _json_safe(value: Any) -> Any:
    number = _as_number(value)
    if number is not None:
        if not math.isfinite(number):
            return None
        if isinstance(value, (int, bool)) or (hasattr(value, "dtype") and "int" in str(value.dtype)):
            return int(number)
        return number
    return value if isinstance(value, (str, type(None))) else str(value)


# ---------------------------------------------------------------------------------------
# Console progress


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """Steps, ETA, reward, KL, tau, beta, tokens/s and step time on one line.

    On a terminal the line is redrawn in place each step; otherwise (CI logs, files) a
    plain line is printed per emission only, so logs stay readable.
    """

    FIELDS = (("reward", "train/reward", "{:.3f}"), ("kl", "train/kl", "{:.4g}"), ("tau", "train/tau", "{:.4g}"),
              ("beta", "train/beta", "{:.4g}"))

    def __init__(self, total_steps: int | None, stream: TextIO, *, first_step: int = 0):
        self.total = total_steps
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.first_step = first_step
        self.start = time.monotonic()
        self.metrics: dict[str, Any] = {}
        self._tokens: tuple[float, float] | None = None  # (num_tokens, time) at the previous emission
        self.tokens_per_s: float | None = None
        self._drawn = False
        # Seconds and count of the steps that did not compile: the ETA's rate (compiling steps
        # would predict hours for a run of minutes).
        self._steady = [0.0, 0]
        self.compiling = False

    def step_timed(self, seconds: float, compile_seconds: float) -> None:
        """One optimizer step took `seconds`, `compile_seconds` of them compiling (or loading compiled code)."""
        self.compiling = compile_seconds > 0.25 * seconds
        if not self.compiling:
            self._steady[0] += seconds
            self._steady[1] += 1

    def format(self, step: int, now: float) -> str:
        done = step - self.first_step
        elapsed = now - self.start
        parts = [f"step {step}/{self.total}" if self.total else f"step {step}"]
        if self.total and done > 0:
            parts[0] += f" ({100 * step / self.total:.0f}%)"
            steady_s, steady_n = self._steady
            eta = _clock(steady_s / steady_n * (self.total - step)) if steady_n else "?"
            parts.append(f"{_clock(elapsed)}<{eta}")
        for label, key, fmt in self.FIELDS:
            value = _as_number(self.metrics.get(key))
            if value is not None:
                parts.append(f"{label} {fmt.format(value)}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        step_time = _as_number(self.metrics.get("time/step_s"))
        if step_time is not None:
            parts.append(f"{step_time:.2f} s/step" + (" (compiling)" if self.compiling else ""))
        return " | ".join(parts)

    def emitted(self, step: int, metrics: Mapping[str, Any]) -> None:
        now = time.monotonic()
        self.metrics = dict(metrics)
        tokens = _as_number(metrics.get("train/num_tokens"))
        if tokens is not None:
            if self._tokens is not None and now > self._tokens[1]:
                self.tokens_per_s = (tokens - self._tokens[0]) / (now - self._tokens[1])
            self._tokens = (tokens, now)
        if not self.tty:
            self.stream.write(self.format(step, now) + "\n")
            self.stream.flush()

    def tick(self, step: int) -> None:
        if self.tty:
            self.stream.write("\r" + self.format(step, time.monotonic()) + "\x1b[K")
            self.stream.flush()
            self._drawn = True

    def finish(self) -> None:
        """End a live terminal line so what follows starts on its own line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def message(self, text: str) -> None:
        """Print a whole line (eval results, notices) without garbling the live line."""
        self.finish()
        self.stream.write(text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------
# The run's telemetry


class Telemetry:
    """metrics.jsonl + W&B + progress for one run; every method is a no-op when not `is_main`.

    `resume_step`: when a run resumes from checkpoint k, records with step > k (the steps
    about to be replayed) are dropped from metrics.jsonl so it reads like one uninterrupted run.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        config: ml_collections.ConfigDict,
        *,
        is_main: bool = True,
        total_steps: int | None = None,
        config_path: str | None = None,
        recipe_path: str | None = None,
        resume_step: int | None = None,
        stream: TextIO | None = None,
    ):
        self.is_main = is_main
        self.workdir = pathlib.Path(workdir)
        self.logging_steps = int(config.logging.logging_steps)
        self.log_completions_enabled = bool(config.logging.log_completions)
        self.header = run_header(config_path, recipe_path)
        self.window = MetricWindow()
        self._step_started = time.monotonic()
        self._wandb = None
        self._metrics_file: TextIO | None = None
        self.progress: ProgressLine | None = None
        if not is_main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.workdir / METRICS_FILE
        if resume_step is not None:
            _truncate_after(metrics_path, resume_step)
            _truncate_after(self.workdir / COMPLETIONS_FILE, resume_step)
        self._metrics_file = open(metrics_path, "a", encoding="utf-8")
        if config.logging.progress:
            CompileClock.install()
            self.progress = ProgressLine(total_steps or config.train.max_steps, stream or sys.stdout,
                                         first_step=resume_step or 0)
        self._init_wandb(config)

    # -- W&B ---------------------------------------------------------------------------

    def _init_wandb(self, config: ml_collections.ConfigDict) -> None:
        lg = config.logging
        mode = wandb_mode(lg.wandb, lg.wandb_project, os.environ, has_api_key=_has_wandb_api_key(os.environ))
        self.wandb_mode = mode
        if mode == "disabled":
            return
        import wandb

        id_file = self.workdir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self._wandb = wandb.init(
            project=lg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
            entity=lg.wandb_entity or None,
            group=lg.wandb_run_group or None,
            name=lg.run_name or None,
            dir=os.environ.get("WANDB_DIR") or str(self.workdir),
            mode=mode,
            id=run_id,
            resume="allow",
            config={**to_json_dict(config), **self.header},
        )

    # -- train metrics -----------------------------------------------------------------

    def steps_begin(self) -> None:
        """The next step starts now: what ran before (warm-up, initial reward, eval) is not its time."""
        self._step_started = time.monotonic()
        CompileClock.take()

    def accumulate(self, metrics: Mapping[str, Any]) -> None:
        """Add one micro-step's (or step's) metrics to the averaging window."""
        if self.is_main:
            self.window.add(metrics)

    def step_end(self, step: int, *, instant: Mapping[str, Any] | None = None,
                 force: bool = False) -> dict[str, Any] | None:
        """Close optimizer step `step`; every `logging_steps` steps (or when `force`), emit the window.

        `instant` values are reported as they are (not averaged): cumulative counters such as
        `train/num_tokens`, the learning rate, the epoch. Returns the emitted record, if any.
        """
        if not self.is_main:
            return None
        now = time.monotonic()
        self.window.add({"time/step_s": now - self._step_started})
        if self.progress is not None:
            self.progress.step_timed(now - self._step_started, CompileClock.take())
            self.progress.tick(step)
        self._step_started = now
        if not (force or step % self.logging_steps == 0):
            return None
        record = {**self.window.pop(), **(instant or {}), "train/global_step": step, **self.header}
        self._write(step, record)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if not k.startswith("run/")}, step=step)
        if self.progress is not None:
            self.progress.emitted(step, record)
        return record

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
        """Emit eval metrics (`eval/...`) for `step` at once, to every sink."""
        if not self.is_main:
            return None
        record = dict(metrics)
        self._write(step, record)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        self.steps_begin()  # the eval's time (and compilation) is not the next step's
        if self.progress is not None:
            shown = ", ".join(f"{k} {v:.4g}" if _as_number(v) is not None else f"{k} {v}" for k, v in record.items())
            self.progress.message(f"eval at step {step}: {shown}")
        return record

    def log_completions(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Sampled completions (`prompt`, `completion`, `advantage`, `reward/<k>` ...) when
        `logging.log_completions`: appended to completions.jsonl and logged as a W&B table."""
        if not (self.is_main and self.log_completions_enabled and rows):
            return
        columns = ["step"] + list(dict.fromkeys(k for row in rows for k in row))
        data = [[step] + [_json_safe(row.get(c)) for c in columns[1:]] for row in rows]
        with open(self.workdir / COMPLETIONS_FILE, "a", encoding="utf-8") as f:
            for values in data:
                f.write(json.dumps(dict(zip(columns, values))) + "\n")
        if self._wandb is not None:
            import wandb

            self._wandb.log({"completions": wandb.Table(columns=columns, data=data)}, step=step)

    def _write(self, step: int, record: Mapping[str, Any]) -> None:
        line = {"step": step, "time": round(time.time(), 3), **{k: _json_safe(v) for k, v in record.items()}}
        write_whole_line(self._metrics_file, json.dumps(line, allow_nan=False) + "\n")

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self.progress is not None:
            self.progress.finish()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_whole_line(f: TextIO, line: str) -> None:
    """Append `line` to the append-mode file `f` and fsync, through its descriptor (Python's buffer
    stays empty). When the disk is full or the write fails otherwise, cut the file back to where it
    was, so metrics.jsonl never ends with half a record, and report a storage fault as one line."""
    fd = f.fileno()
    start = os.lseek(fd, 0, os.SEEK_END)
    data = line.encode("utf-8")
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError as err:
        os.ftruncate(fd, start)  # freeing space never needs space
        problem = storage_problem(err)
        if problem is None:
            raise
        raise StorageFault(f"could not write {f.name}: {problem}; free space (or make the workdir writable) and "
                        "rerun the same command to resume from the newest checkpoint") from None


def _truncate_after(path: pathlib.Path, step: int) -> None:
    """Drop JSONL records with `step` > `step` (and a torn last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
