"""Figures: medians with min-max, ratios against targets, the table and RESULTS.md."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


@dataclass
class Figure:
    suite: str
    label: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def cells(self) -> str:
        if not self.values:
            return "n/a"
        low, high = min(self.values), max(self.values)
        return f"{self.median:,.0f} ({low:,.0f}-{high:,.0f})"


@dataclass
class Ratio:
    suite: str
    label: str
    value: float
    target: str

    @property
    def met(self) -> str:
        if not self.target:
            return ""
        return "yes" if self.value >= float(self.target.lstrip(">= ")) else "NO"


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figure(self, suite: str, label: str, unit: str) -> Figure:
        found = Figure(suite, label, unit)
        self.figures.append(found)
        return found

    def ratio(self, suite: str, label: str, top: Figure, bottom: Figure, target: str = "") -> None:
        # Round by round (both sides ran back to back), then the median: the
        # load of a shared machine drifts, and this cancels most of the drift.
        pairs = list(zip(top.values, bottom.values, strict=False)) or [(top.median, bottom.median)]
        if top.unit.startswith("µs"):  # lower is better: invert so that > 1 means faster
            pairs = [(b, t) for t, b in pairs]
        value = statistics.median(t / b for t, b in pairs if b) if pairs else float("nan")
        self.ratios.append(Ratio(suite, label, value, target))

    def table(self) -> str:
        lines = ["| suite | measurement | median (min-max) | unit |", "|---|---|---|---|"]
        lines += [f"| {f.suite} | {f.label} | {f.cells()} | {f.unit} |" for f in self.figures]
        lines += ["", "| suite | ratio | value | target | met |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.suite} | {r.label} | {r.value:.2f}x | {r.target} | {r.met} |"
            for r in self.ratios
        ]
        return "\n".join(lines)


def _tool_version(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return (
        (done.stdout or done.stderr).strip().splitlines()[0]
        if done.stdout or done.stderr
        else "n/a"
    )


def machine() -> list[str]:
    packages = ("celery", "kombu", "redis", "SQLAlchemy", "asyncpg", "fastapi")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"load average at start {load}",
        f"- OS: {platform.platform()}",
        f"- Python {sys.version.split()[0]}; "
        + ", ".join(f"{name} {version(name)}" for name in packages),
        f"- Redis: {_tool_version('redis-server', '--version')}",
        f"- RabbitMQ: {_tool_version('rabbitmqctl', '-q', 'version')}",
        f"- PostgreSQL: {_tool_version('psql', '--version')}",
    ]


def write_results(
    report: Report, command: str, machine_lines: list[str], path: str | None = None
) -> None:
    text = [
        "# Benchmark results",
        "",
        f"Produced by `{command}` (see bench/README section in the project README).",
        "",
        "## Machine",
        "",
        *machine_lines,
        "",
        "## Figures",
        "",
        "Throughput in tasks/s (higher is better), dispatch cost in µs per call (lower is",
        "better); median of the rounds with min-max; every ratio compares two sides",
        "measured in the same run, round by round alternately, with the same broker,",
        "pool, concurrency and result settings. A ratio is the median of the",
        "per-round ratios.",
        "",
        report.table(),
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in report.notes],
        "",
    ]
    (Path(path) if path else RESULTS).write_text("\n".join(text))
