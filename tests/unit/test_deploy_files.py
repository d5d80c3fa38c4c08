"""deploy/: env files that name every setting, units and compose services that agree.

The rehearsal that runs these files is tests/integration/test_deployment.py;
these checks need no service and fail as soon as a file drifts from the code
or from its twin (a unit and its compose service).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.background.celery_app import build_celery_config
from app.core.background.internals.retry import QUEUE_NAMES, RETRY_POLICIES
from app.core.config import Settings
from tests.support.deploy_files import (
    ENV_DIR,
    HOST_ENV_DIR,
    HOST_PYTHON,
    UNITS,
    env_file_names,
    process_spec,
    read_compose,
    read_env_file,
    read_unit,
    split_unit_name,
    unit_files,
)

COMMON = ENV_DIR / "common.env"
WORKER_GROUPS = sorted(p.stem.removeprefix("worker-") for p in ENV_DIR.glob("worker-*.env"))
SERVICES = [
    "background-migrate.service",
    *(f"background-worker@{group}.service" for group in WORKER_GROUPS),
    "background-beat.service",
    "background-relay.service",
    "background-api.service",
]
LONG_RUNNING = [name for name in SERVICES if name != "background-migrate.service"]
LONGEST_TIME_LIMIT = max(policy.time_limit for policy in RETRY_POLICIES.values())


def setting_names() -> set[str]:
    # pydantic-settings reads each field from the variable of its upper-cased name.
    return {name.upper() for name in Settings.model_fields}


def test_common_env_names_every_setting() -> None:
    missing = setting_names() - env_file_names(COMMON)
    assert not missing, f"settings missing from deploy/env/common.env: {sorted(missing)}"


def test_common_env_names_nothing_but_settings() -> None:
    unknown = env_file_names(COMMON) - setting_names()
    assert not unknown, f"not settings of app/core/config.py: {sorted(unknown)}"


def test_common_env_is_a_valid_production_configuration() -> None:
    values = read_env_file(COMMON)
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in values.items()})  # type: ignore[call-arg]
    assert settings.environment == "production"
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.celery_broker_url.startswith("redis://")
    assert not settings.should_create_tables
    assert settings.log_format == "json"
    # The start-up check of the visibility timeout against the time limits passes.
    build_celery_config(settings)


def test_process_env_files_set_only_their_own_variables() -> None:
    """A process's file adds its command's variables (or a setting), never a typo."""
    used: set[str] = set()
    for name in SERVICES:
        file_name, _ = split_unit_name(name)
        for line in read_unit(UNITS / file_name).values("Service", "ExecStart"):
            used |= set(re.findall(r"\$\{(\w+)\}", line))
    for path in ENV_DIR.glob("*.env"):
        if path == COMMON:
            continue
        unknown = set(read_env_file(path)) - used - setting_names()
        assert not unknown, f"{path.name}: {sorted(unknown)} is used by no unit"


def test_worker_groups_take_every_queue_once() -> None:
    queues = [
        queue
        for group in WORKER_GROUPS
        for queue in read_env_file(ENV_DIR / f"worker-{group}.env")["WORKER_QUEUES"].split(",")
    ]
    assert sorted(queues) == sorted(QUEUE_NAMES)


def test_every_unit_reads_the_common_env_file_first() -> None:
    for name in SERVICES:
        file_name, _ = split_unit_name(name)
        files = read_unit(UNITS / file_name).values("Service", "EnvironmentFile")
        assert files[0] == f"{HOST_ENV_DIR}common.env", name
        assert process_spec(name).exec_start[0] == HOST_PYTHON


def test_workers_stop_warm_within_a_longer_timeout_than_any_task() -> None:
    unit = read_unit(UNITS / "background-worker@.service")
    assert unit.value("Service", "KillSignal") == "SIGTERM"
    # Only the main process gets SIGTERM: a prefork pool process would die mid-task.
    assert unit.value("Service", "KillMode") == "mixed"
    assert float(unit.value("Service", "TimeoutStopSec") or 0) > LONGEST_TIME_LIMIT
    compose = read_compose()["services"]
    for group in WORKER_GROUPS:
        grace = compose[f"worker-{group}"]["stop_grace_period"]
        assert grace.endswith("s")
        assert float(grace[:-1]) > LONGEST_TIME_LIMIT


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_restart_on_failure_and_check_their_health(name: str) -> None:
    file_name, _ = split_unit_name(name)
    unit = read_unit(UNITS / file_name)
    assert unit.value("Service", "Restart") == "on-failure"
    assert unit.value("Service", "KillSignal") == "SIGTERM"
    assert unit.value("Unit", "PartOf") == "background.target"
    assert unit.value("Install", "WantedBy") == "background.target"
    (post,) = process_spec(name).exec_start_post
    process_type = re.split(r"[-@.]", name)[1]  # background-worker@default.service -> worker
    assert post[1:5] == ["-m", "app.core.background", "health", process_type]
    assert "--wait" in post


def after(name: str) -> set[str]:
    file_name, _ = split_unit_name(name)
    lines = read_unit(UNITS / file_name).values("Unit", "After")
    return {unit for line in lines for unit in line.split()}


def test_units_encode_the_start_and_stop_order() -> None:
    """Start: migrations, workers, beat, then relay and API; systemd stops in reverse."""
    worker = read_unit(UNITS / "background-worker@.service")
    assert "background-migrate.service" in after("background-worker@default.service")
    assert worker.value("Unit", "Before") == "background-workers.target"
    assert "background-workers.target" in after("background-beat.service")
    for name in ("background-relay.service", "background-api.service"):
        assert {"background-workers.target", "background-beat.service"} <= after(name)


def test_compose_encodes_the_same_order() -> None:
    services = read_compose()["services"]
    workers = {f"worker-{group}" for group in WORKER_GROUPS}
    assert services["worker-default"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert workers <= set(services["beat"]["depends_on"])
    for name in ("relay", "api"):
        assert workers | {"beat"} <= set(services[name]["depends_on"])


def test_compose_runs_what_the_units_run() -> None:
    """Same process types, same commands (after the interpreter), same env files."""
    services = {
        service["x-systemd"]: service
        for service in read_compose()["services"].values()
        if "x-systemd" in service
    }
    assert sorted(services) == sorted(SERVICES)
    for name, service in services.items():
        spec = process_spec(name)
        command = service["command"]
        assert command[0] == "python", name
        assert command[1:] == spec.exec_start[1:], name
        file_name, instance = split_unit_name(name)
        unit_env = [
            value.replace("%i", instance or "").removeprefix(HOST_ENV_DIR)
            for value in read_unit(UNITS / file_name).values("Service", "EnvironmentFile")
        ]
        assert service["env_file"] == [f"env/{file}" for file in unit_env], name
        if not spec.exec_start_post:
            continue
        # The compose health check is the unit's start check without its --wait.
        (post,) = spec.exec_start_post
        wait = post.index("--wait")
        assert service["healthcheck"]["test"] == ["CMD", "python", *post[1:wait], *post[wait + 2 :]]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys, bad values, missing units it depends on."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    for path in unit_files():
        # The interpreter must exist for verify: this one stands in for the host's.
        (tmp_path / path.name).write_text(path.read_text().replace(HOST_PYTHON, sys.executable))
    names = [
        "background.target",
        "background-workers.target",
        *SERVICES,
    ]
    result = subprocess.run(
        [analyze, "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
