"""Reading deploy/: the systemd units, the env files and compose.yaml, as the tests use them.

``process_spec("background-worker@default.service", overrides)`` gives what
systemd would run for that unit: the environment of its ``EnvironmentFile=``
lines (``/etc/app-background/X`` is ``deploy/env/X``), then ``overrides`` (the
test's own servers, ports and paths), and its ``ExecStart=`` and
``ExecStartPost=`` command lines with the specifiers (``%i``, ``%%``) and
``${VAR}`` replaced as systemd does. Only the syntax the units use is
supported; anything else fails loudly, so a unit cannot say more than the
tests read.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
ENV_DIR = DEPLOY / "env"
COMPOSE = DEPLOY / "compose.yaml"

# Where the units expect things on a host.
HOST_ENV_DIR = "/etc/app-background/"
HOST_PYTHON = "/opt/app/.venv/bin/python"
HOST_APP_DIR = "/opt/app"

_ENV_LINE = re.compile(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class UnitFile:
    name: str
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def values(self, section: str, key: str) -> list[str]:
        return [value for k, value in self.sections.get(section, []) if k == key]

    def value(self, section: str, key: str) -> str | None:
        found = self.values(section, key)
        return found[-1] if found else None


def read_unit(path: Path) -> UnitFile:
    unit = UnitFile(path.name)
    section: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: continuation lines not supported"
        if line.startswith("[") and line.endswith("]"):
            section = unit.sections.setdefault(line[1:-1], [])
            continue
        assert section is not None, f"{path.name}:{number}: outside a section: {raw!r}"
        assert "=" in line, f"{path.name}:{number}: {raw!r}"
        key, value = line.split("=", 1)
        section.append((key.strip(), value.strip()))
    return unit


def unit_files() -> list[Path]:
    return sorted(UNITS.iterdir())


def read_env_file(path: Path) -> dict[str, str]:
    """The variables an env file sets (its commented ``#KEY=`` lines set nothing)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = _ENV_LINE.match(line)
        if match and not match.group(1):
            value = match.group(3)
            # systemd and compose would read quotes and "$" differently: none.
            assert not set(value) & {'"', "'", "$"}, line
            values[match.group(2)] = value
    return values


def env_file_names(path: Path) -> set[str]:
    """Every variable an env file names, set (``KEY=``) or documented unset (``#KEY=``)."""
    names = set()
    for line in path.read_text().splitlines():
        match = _ENV_LINE.match(line)
        if match:
            names.add(match.group(2))
    return names


def split_unit_name(name: str) -> tuple[str, str | None]:
    """``background-worker@default.service`` -> (``background-worker@.service``, ``default``)."""
    stem, _dot, suffix = name.rpartition(".")
    if "@" in stem:
        prefix, instance = stem.split("@", 1)
        return f"{prefix}@.{suffix}", instance or None
    return name, None


def specifiers(text: str, instance: str | None) -> str:
    """systemd's ``%i`` and ``%%``; any other specifier is refused (the units use none)."""

    def replace(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "%":
            return "%"
        if letter == "i" and instance is not None:
            return instance
        raise AssertionError(f"unsupported specifier %{letter} in {text!r}")

    return re.sub(r"%(.)", replace, text)


def command_line(text: str, instance: str | None, env: Mapping[str, str]) -> list[str]:
    """An ``Exec*=`` line as systemd splits it: words, specifiers, then ``${VAR}`` per word."""
    assert not re.search(r"\$[A-Za-z_]", text), f"use ${{VAR}}, not $VAR: {text!r}"
    words = shlex.split(specifiers(text, instance))

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"{name} is set by no env file of this unit ({text!r})"
        return env[name]

    return [_VARIABLE.sub(variable, word) for word in words]


@dataclass(frozen=True)
class ProcessSpec:
    unit: str
    env: dict[str, str]
    exec_start: list[str]
    exec_start_post: list[list[str]]
    working_directory: str | None

    def local(self, argv: list[str], python: str) -> list[str]:
        """``argv`` with the host's interpreter replaced by ``python``."""
        assert argv[0] == HOST_PYTHON, argv
        return [python, *argv[1:]]


def process_spec(unit_name: str, overrides: Mapping[str, str] | None = None) -> ProcessSpec:
    """What systemd runs for ``unit_name`` (an instance of a template included)."""
    file_name, instance = split_unit_name(unit_name)
    unit = read_unit(UNITS / file_name)
    env: dict[str, str] = {}
    for entry in unit.values("Service", "EnvironmentFile"):
        path = specifiers(entry.lstrip("-"), instance)
        assert path.startswith(HOST_ENV_DIR), path
        env.update(read_env_file(ENV_DIR / path.removeprefix(HOST_ENV_DIR)))
    env.update(overrides or {})
    start = unit.values("Service", "ExecStart")
    assert len(start) == 1, f"{unit_name}: one ExecStart= expected"
    return ProcessSpec(
        unit=unit_name,
        env=env,
        exec_start=command_line(start[0], instance, env),
        exec_start_post=[
            command_line(line, instance, env) for line in unit.values("Service", "ExecStartPost")
        ],
        working_directory=unit.value("Service", "WorkingDirectory"),
    )


def read_compose() -> dict[str, Any]:
    import yaml

    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded
