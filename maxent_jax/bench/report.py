"""What every benchmark figure carries: the machine, library versions, repeats, median and spread.

A `Report` is a list of `Figure`s (one measured quantity each, with all its samples) plus
ratios between figures, the machine description and free-form notes; it prints as a table
and serialises to JSON. The machine is shared, so the load average is read before and after
every figure and stored with it.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence


@dataclasses.dataclass
class Figure:
    """One measured quantity: `samples` from repeated runs (higher is better unless `unit` says s)."""

    name: str
    unit: str
    samples: list[float]
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before / after the runs
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the repeats."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "median": self.median, "min": min(self.samples),
                "max": max(self.samples), "spread": self.spread, "samples": self.samples,
                "load_before_after": list(self.load), **({"detail": self.detail} if self.detail else {})}


def load_average() -> float:
    """The 1-minute load average (the machine is shared: a figure means little without it)."""
    return os.getloadavg()[0]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(packages: Sequence[str] = ("jax", "jaxlib", "flax", "optax", "numpy")) -> dict[str, Any]:
    """Machine, accelerator and library versions (jax is imported: every target uses it)."""
    import jax

    devices = jax.devices()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "device_kind": devices[0].device_kind,
        "device_platform": devices[0].platform,
        "device_count": len(devices),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in packages},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": "python -m maxent_jax.bench " + " ".join(sys.argv[1:]),
    }


@dataclasses.dataclass
class Report:
    target: str
    preset: str
    repeats: int
    setup: dict[str, Any]  # what was measured: shapes, lengths, dtypes
    figures: list[Figure] = dataclasses.field(default_factory=list)
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    machine: dict[str, Any] = dataclasses.field(default_factory=machine)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def figure(self, name: str) -> Figure:
        return next(f for f in self.figures if f.name == name)

    def ratio(self, name: str, numerator: str, denominator: str) -> float:
        """Record median(numerator) / median(denominator) under `name`."""
        value = self.figure(numerator).median / self.figure(denominator).median
        self.ratios[name] = value
        return value

    def add_package_versions(self, packages: Sequence[str]) -> None:
        self.machine["versions"].update({p: _version(p) for p in packages})

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "preset": self.preset, "repeats": self.repeats, "setup": self.setup,
                "machine": self.machine, "figures": [f.to_json() for f in self.figures], "ratios": self.ratios,
                "notes": self.notes}

    def write_json(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        """The report as aligned text: header lines, one row per figure, ratios, notes."""
        m = self.machine
        versions = " ".join(f"{k}={v}" for k, v in m["versions"].items() if v)
        lines = [
            f"maxent_jax.bench {self.target} (preset {self.preset}, {self.repeats} repeats, {m['date_utc']} UTC)",
            f"machine: {m['cpu']}, {m['cores_usable']}/{m['cores']} cores; jax devices: {m['device_count']} x "
            f"{m['device_kind']} ({m['device_platform']})",
            f"versions: python={m['python']} {versions}",
            "setup: " + ", ".join(f"{k}={v}" for k, v in self.setup.items()),
        ]
        rows = [("figure", "median", "min", "max", "spread", "unit", "load")]
        for f in self.figures:
            rows.append((f.name, _num(f.median), _num(min(f.samples)), _num(max(f.samples)),
                         f"{100 * f.spread:.0f}%", f.unit, f"{f.load[0]:.1f}->{f.load[1]:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        for name, value in self.ratios.items():
            lines.append(f"ratio {name}: {value:.2f}x")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"
