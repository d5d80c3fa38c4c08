"""Mutation testing of the modules that carry the framework's safety claims (cosmic-ray).

    scripts/mutation.sh                 # every target below
    scripts/mutation.sh lease_stores    # some of them, by name
    scripts/mutation.sh --list          # the targets and their tests

Each target is a module (optionally some of its functions) and the tests that
must catch a change to it. For every target the working tree is copied to a
temporary folder (cosmic-ray changes files in place, and the tests start real
workers that import the code from disk), cosmic-ray makes its mutants there,
and each mutant runs the target's tests against the test run's own services.

Not every mutant is worth a run: changes inside type annotations (they are
strings under ``from __future__ import annotations``) are skipped, and so are
the operators that only multiply the same question (all twelve replacements
of one binary operator: one is kept). A survivor is printed with its diff;
either a test is missing, or the mutant behaves the same (say why next to the
code and end the line with ``# pragma: no mutate``: this script skips it).

Not part of CI: a full run takes a long time (minutes per target). Run it
before saying that a change to one of these modules is safe.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTERNALS = "app/core/background/internals"


@dataclass(frozen=True)
class Target:
    name: str
    module: str
    tests: tuple[str, ...]
    # Only mutate inside these functions or classes (empty: the whole module).
    definitions: tuple[str, ...] = field(default=())
    timeout: float = 180.0


DISPATCH_FAILURES = "tests/integration/test_dispatch_failures.py"
# The dispatch-failure tests that reach after_commit.py (the others do not).
ON_COMMIT_FAILURES = tuple(
    f"{DISPATCH_FAILURES}::{name}"
    for name in (
        "test_delay_on_commit_with_the_broker_down_goes_to_the_outbox",
        "test_delay_on_commit_with_fallback_error_reports_the_task_lost",
        "test_delay_on_commit_without_an_outbox_table_reports_the_task_lost",
    )
)
DEDUP_TESTS = "tests/integration/test_dedup.py"
# The trace kept by delay_on_commit and outbox rows (the lines that only run with tracing on).
TRACING_TESTS = "tests/integration/test_tracing.py"
ADMISSION_TESTS = "tests/integration/test_admission.py"
STORE_TESTS = "tests/integration/test_admission_stores.py"
TWENTY_TENANTS = "test_twenty_tenants_never_run_more_than_three_each_across_two_workers"

TARGETS = (
    Target("lease_stores", f"{INTERNALS}/delivery/lease_stores.py",
           ("tests/integration/test_lease_stores.py",)),
    # dedup.py in two targets. Its pure functions (keys, periods, lifetimes) are
    # covered by unit tests in seconds. The lease paths (send, start, end,
    # revoke, the worker signals) by the Redis-backend scenarios of
    # test_dedup.py, one worker for all: each path once (release after success,
    # failure, Ignore, Reject, a hard time limit, a lost worker; kept on retry
    # and a requeue; extended at start and by a retry's send; revoked and expired ids;
    # run-once; a period's lease), and a failed send giving its lease back.
    # Left out, for speed: the same scenarios on the SQLite and PostgreSQL
    # lease stores (the store is lease_stores' target), the 24-racer race, the
    # crashed-worker expiry, the revoke no worker heard and the two-beat run.
    Target("dedup_keys", f"{INTERNALS}/delivery/dedup.py", ("tests/unit/test_dedup_keys.py",),
           definitions=("notify_key", "update_key", "daily_key", "args_key", "lease_lifetime",
                        "period_key", "_next_day")),
    Target("dedup", f"{INTERNALS}/delivery/dedup.py", (
        "tests/unit/test_settings.py::test_auto_dedup_backend_follows_the_broker",
        "tests/unit/test_settings.py::test_an_explicit_dedup_backend_wins_over_the_broker",
        "tests/unit/test_dedup_keys.py::test_a_skipped_duplicate_is_counted_under_its_task_and_queue",
        *(f"{DEDUP_TESTS}::{name}" for name in (
            "test_second_call_while_running_is_deduplicated_and_id_freed_after_success[redis]",
            "test_id_freed_after_failure[redis]",
            "test_retrying_task_keeps_its_id_and_runs_once_per_attempt[redis]",
            "test_a_rejected_and_requeued_message_keeps_its_lease_until_it_ends",
            "test_a_run_ended_by_ignore_frees_its_id",
            "test_a_message_rejected_for_good_frees_its_id",
            "test_calls_without_task_id_do_not_touch_leases",
            "test_a_task_that_starts_extends_its_lease_past_the_original_lifetime",
            "test_a_retry_extends_its_lease_and_a_retry_without_one_takes_none",
            "test_a_period_ending_within_the_second_keeps_its_id_until_then",
            "test_a_periods_lease_lives_until_the_period_ends_not_longer",
            "test_a_failing_lease_store_is_logged_with_the_task_id",
            "test_revoked_id_is_refused_with_a_clear_error",
            "test_expired_task_is_refused_like_a_revoked_one",
            "test_hard_time_limit_fails_the_task_and_frees_its_id",
            "test_worker_death_without_retries_left_frees_the_id",
            "test_db_task_killed_after_its_commit_is_not_run_again",
            "test_same_period_fired_twice_runs_once_and_keeps_its_lease",
        )),
        f"{DISPATCH_FAILURES}::test_a_failed_send_with_a_task_id_gives_its_lease_back",
    ), definitions=("is_deduplicated", "log_deduplicated", "TaskIdRevokedError", "Deduplicator",
                    "_lease_headers", "run_once_key", "_on_prerun", "_on_postrun", "_on_failure",
                    "_on_revoked", "connect_worker_signals", "store_from_settings"), timeout=400),
    Target("completions", f"{INTERNALS}/delivery/completions.py",
           ("tests/integration/test_completions.py",)),
    Target("after_commit", f"{INTERNALS}/delivery/after_commit.py",
           ("tests/unit/test_after_commit.py", "tests/integration/test_after_commit_worker.py",
            *ON_COMMIT_FAILURES, TRACING_TESTS)),
    Target("publish", f"{INTERNALS}/delivery/publish.py",
           ("tests/unit/test_run_decision.py", "tests/unit/test_after_commit.py",
            "tests/integration/test_publish.py", "tests/integration/test_bulk_dispatch.py",
            DISPATCH_FAILURES)),
    Target("outbox", f"{INTERNALS}/delivery/outbox.py",
           ("tests/unit/test_outbox_rows.py", "tests/integration/test_outbox.py",
            f"{DISPATCH_FAILURES}::test_relay_once_fails_when_the_broker_does_not_take_a_row",
            *ON_COMMIT_FAILURES, TRACING_TESTS)),
    Target("exceptions", f"{INTERNALS}/exceptions.py",
           ("tests/unit/test_error_classification.py",
            "tests/integration/test_postgres_errors.py")),
    Target("retry", f"{INTERNALS}/retry.py", ("tests/unit/test_retry_policies.py",)),
    # Task limits: the declaration (unit tests, seconds); the stores' decisions on
    # Redis, SQLite and PostgreSQL (seconds); the gate on real workers, without
    # the two long proofs (4,000 capped runs, 2,000 paced ones: a minute each).
    Target("admission_limits", f"{INTERNALS}/admission/limits.py",
           ("tests/unit/test_task_limits.py", "tests/unit/test_declaration.py")),
    Target("admission_stores", f"{INTERNALS}/admission/stores.py",
           # The tables' columns: the migrations test compares them with the schema.
           ("tests/integration/test_admission_stores.py", "tests/integration/test_migrations.py")),
    Target("admission_gate", f"{INTERNALS}/admission/gate.py",
           ("tests/integration/test_admission_stores.py", "tests/integration/test_admission.py",
            "--deselect", f"{ADMISSION_TESTS}::{TWENTY_TENANTS}",
            "--deselect", f"{ADMISSION_TESTS}::test_a_rate_limit_holds_across_two_workers"),
           timeout=300),
    # The slots given back by the keeper's thread, and the consumer's looks: the
    # store tests that drive them directly, and the cap on real workers in every mode.
    Target("admission_keeper_and_screen", f"{INTERNALS}/admission/gate.py",
           (f"{STORE_TESTS}::test_the_keeper_renews_a_held_slot_until_it_is_dropped",
            f"{STORE_TESTS}::test_slots_given_back_are_sent_by_the_keeper_and_flush_sends_the_rest",
            *(f"{STORE_TESTS}::{name}" for name in (
                "test_a_slot_given_back_goes_with_the_next_take_and_the_keeper_does_not_send_it_again",
                "test_a_slot_nobody_claims_is_sent_alone_once_its_linger_is_over",
                "test_a_slot_claimed_by_a_take_that_fails_goes_back_all_the_same",
                "test_a_take_refused_still_returns_the_slot_it_claimed",
                "test_runs_in_many_threads_return_each_slot_once",
            )),
            f"{STORE_TESTS}::test_the_consumer_looks_at_a_keyed_task_now_and_then_until_a_look_is_refused",
            f"{ADMISSION_TESTS}::test_a_cap_holds_in_every_execution_mode",
            f"{ADMISSION_TESTS}::test_the_consumer_sends_a_message_that_must_wait_back_before_the_pool"),
           definitions=("Ticket", "SlotKeeper", "seems_clear", "screen", "_look"), timeout=300),
    Target("admission_consumer", f"{INTERNALS}/admission/consumer.py",
           (f"{ADMISSION_TESTS}::test_the_consumer_sends_a_message_that_must_wait_back_before_the_pool",
            f"{ADMISSION_TESTS}::test_a_waiting_task_shows_as_waiting_and_keeps_its_attempt",
            f"{ADMISSION_TESTS}::test_a_deduplicated_task_keeps_its_lease_while_it_waits_and_runs_once"),
           timeout=300),
    # The bound on runs lost with their process (runner.py), in seconds: the
    # decision alone. The Redis script that counts them is result_backend's.
    Target("lost_runs", f"{INTERNALS}/runner.py", ("tests/unit/test_run_decision.py",),
           definitions=("_runs_lost_before",)),
    # The run decision: retry or fail (test_worker_redis_postgres, without its
    # thousand-task throughput run), and run-once in the db task's transaction
    # (the run-once scenarios of test_dedup, on the Redis lease store).
    Target("run_decision", f"{INTERNALS}/runner.py",
           ("tests/unit/test_run_decision.py", "tests/integration/test_worker_redis_postgres.py",
            "--deselect",
            "tests/integration/test_worker_redis_postgres.py::test_a_thousand_db_tasks_through_prefork",
            *(f"{DEDUP_TESTS}::{name}" for name in (
                "test_db_task_killed_after_its_commit_is_not_run_again",
                "test_db_task_killed_after_its_own_explicit_commit_is_not_run_again",
                "test_db_task_failing_after_an_explicit_commit_is_retried_and_runs_again",
                "test_a_bulk_job_killed_after_a_batch_runs_again_from_the_start",
                "test_without_task_id_the_same_death_completes_the_work_twice",
                "test_two_deliveries_running_at_once_commit_once",
            ))),
           definitions=("_after_failure", "failure_outcome", "_run_in_transaction", "execute"),
           timeout=300),
)  # fmt: skip

# One replacement per binary operator and the comparisons that move a boundary
# or flip a test; the other variants ask the same question again.
KEPT_BINARY = {"Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Mul", "Mod_Mul", "Pow_Mul",
               "BitOr_BitAnd", "BitAnd_BitOr"}  # fmt: skip
KEPT_COMPARISON = {"Eq_NotEq", "NotEq_Eq", "Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt", "Is_IsNot",
                   "IsNot_Is", "In_NotIn", "NotIn_In"}  # fmt: skip


def worth_running(operator: str) -> bool:
    name = operator.split("/")[-1]
    if name.startswith("ReplaceBinaryOperator_"):
        return name.removeprefix("ReplaceBinaryOperator_") in KEPT_BINARY
    if name.startswith("ReplaceComparisonOperator_"):
        return name.removeprefix("ReplaceComparisonOperator_") in KEPT_COMPARISON
    return True


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of every annotation in ``source`` (rows 1-based)."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        annotations: list[ast.expr | None] = []
        if isinstance(node, ast.arg):
            annotations.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is not None and annotation.end_lineno is not None:
                start = (annotation.lineno, annotation.col_offset)
                end = (annotation.end_lineno, annotation.end_col_offset or 0)
                spans.append((start, end))
    return spans


def definition_spans(source: str, names: Sequence[str]) -> list[tuple[int, int]]:
    """Row ranges of the functions or classes called ``names``."""
    return [
        (node.lineno, node.end_lineno or node.lineno)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and node.name in names
    ]


def skip_uninteresting(session: Path, module: Path, target: Target) -> tuple[int, int]:
    """Mark mutants not worth a test run as skipped; (kept, skipped)."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    source = module.read_text()
    lines = source.splitlines()
    annotations = annotation_spans(source)
    definitions = definition_spans(source, target.definitions) if target.definitions else None
    kept = skipped = 0
    with use_db(str(session)) as db:
        for item in list(db.pending_work_items):
            mutation = item.mutations[0]
            start, end = tuple(mutation.start_pos), tuple(mutation.end_pos)
            reason = None
            if not worth_running(mutation.operator_name):
                reason = "operator variant"
            elif any(a <= start and end <= b for a, b in annotations):
                reason = "inside an annotation"
            elif definitions is not None and not any(a <= start[0] <= b for a, b in definitions):
                reason = "outside the target's functions"
            elif "pragma: no mutate" in lines[start[0] - 1]:
                reason = "pragma: no mutate"
            if reason is None:
                kept += 1
                continue
            skipped += 1
            db.set_result(
                item.job_id, WorkResult(output=reason, worker_outcome=WorkerOutcome.SKIPPED)
            )
    return kept, skipped


@dataclass
class Outcome:
    target: Target
    mutants: int = 0
    killed: int = 0
    survived: list[str] = field(default_factory=list)
    skipped: int = 0
    incompetent: int = 0
    error: str | None = None


def copy_tree(destination: Path) -> None:
    """The working tree's tracked and new files (uncommitted changes included)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.split(b"\0")  # fmt: skip
    for raw in listed:
        if not raw:
            continue
        path = Path(raw.decode())
        if not (ROOT / path).is_file():
            continue
        (destination / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, destination / path)


def run_target(target: Target, python: str) -> Outcome:
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    outcome = Outcome(target)
    work = Path(tempfile.mkdtemp(prefix=f"mutation-{target.name}-"))
    try:
        copy_tree(work)
        tests = " ".join(target.tests)
        config = work / "cosmic-ray.toml"
        config.write_text(textwrap.dedent(f"""\
            [cosmic-ray]
            module-path = "{target.module}"
            timeout = {target.timeout}
            excluded-modules = []
            test-command = "{python} -m pytest -x -q -p no:cacheprovider {tests}"

            [cosmic-ray.distributor]
            name = "local"
        """))  # fmt: skip
        session = work / "session.sqlite"
        env = {**os.environ, "PYTHONPATH": str(work)}
        cosmic = [python, "-m", "cosmic_ray.cli"]

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*cosmic, *args], cwd=work, env=env, capture_output=True, text=True
            )

        if (init := run("init", str(config), str(session))).returncode:
            outcome.error = init.stderr[-2000:]
            return outcome
        kept, outcome.skipped = skip_uninteresting(session, work / target.module, target)
        outcome.mutants = kept
        if (baseline := run("baseline", str(config))).returncode:
            outcome.error = "the tests fail without any mutant:\n" + baseline.stdout[-3000:]
            return outcome
        run("exec", str(config), str(session))
        with use_db(str(session)) as db:
            for item, result in db.completed_work_items:
                if result.worker_outcome == WorkerOutcome.SKIPPED:
                    continue
                if result.test_outcome == TestOutcome.KILLED:
                    outcome.killed += 1
                elif result.test_outcome == TestOutcome.INCOMPETENT:
                    outcome.incompetent += 1
                else:
                    mutation = item.mutations[0]
                    where = f"{mutation.module_path}:{mutation.start_pos[0]}"
                    outcome.survived.append(f"{where} {mutation.operator_name}\n{result.diff}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcome


def report(outcomes: Sequence[Outcome]) -> Iterator[str]:
    yield "| target | module | mutants run | killed | survived | not viable | skipped |"
    yield "|---|---|---|---|---|---|---|"
    for o in outcomes:
        yield (
            f"| {o.target.name} | {o.target.module.removeprefix(INTERNALS + '/')} | {o.mutants} "
            f"| {o.killed} | {len(o.survived)} | {o.incompetent} | {o.skipped} |"
        )
    for o in outcomes:
        if o.error:
            yield f"\n## {o.target.name}: could not run\n{o.error}"
        for survivor in o.survived:
            yield f"\n## survivor in {o.target.name}: {survivor}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="target names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--jobs", type=int, default=2, help="targets run at the same time")
    args = parser.parse_args(argv)
    by_name = {target.name: target for target in TARGETS}
    if args.list:
        for target in TARGETS:
            print(f"{target.name:14} {target.module}  <- {' '.join(target.tests)}")
        return 0
    unknown = [name for name in args.targets if name not in by_name]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; --list shows them")
    chosen = [by_name[name] for name in args.targets] or list(TARGETS)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = list(pool.map(lambda t: run_target(t, sys.executable), chosen))
    for line in report(outcomes):
        print(line)
    return 1 if any(o.survived or o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
