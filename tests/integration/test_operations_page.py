"""The operations page in a real browser: Debian's chromium, driven through chromedriver.

The example app runs in its own uvicorn process on this run's Redis and
PostgreSQL, the tasks on the session's prefork worker. The test does what the
engineer on call does: opens the page while a task has failed, reads the
failure, fixes the cause, clicks replay and sees the new task succeed; and
cancels a running task from the page. Screenshots are kept in
``test-artifacts/operations/`` (one of them is in the README).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from app.core.background import celery_app
from tests.support import tasks_operations
from tests.support.redis_server import free_port
from tests.support.services import Services
from tests.support.tasks_operations import blocked_key

pytestmark = pytest.mark.usefixtures("worker")

PASSWORD = "page-test-password"
WAIT = 60.0
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "operations"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def api(stack: Services) -> Iterator[str]:
    """The example app under uvicorn on a free port; its URL with the operator's credentials."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="api-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.support.operations_app:app", "--host", "127.0.0.1",
         "--port", str(port)],
        env={**os.environ, "OPERATIONS_PASSWORD": PASSWORD},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/docs", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(Path(log.name).read_text()[-3000:]) from None
                time.sleep(0.2)
        yield f"http://operator:{PASSWORD}@127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        from tests.support.services import unavailable

        unavailable("chromium and chromium-driver are not installed (apt-get install them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1280,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


def text_after_click(driver: Any, element_id: str) -> str:
    """The text of ``element_id`` on the page a click led to (a click does not wait for it)."""
    from selenium.webdriver.common.by import By

    found = wait_for(
        lambda: driver.find_elements(By.ID, element_id), f"#{element_id} after the click", 15
    )
    return str(found[0].text)


def test_open_the_page_while_a_task_fails_replay_it_and_see_it_succeed(
    api: str, browser: Any, stack: Services
) -> None:
    from selenium.webdriver.common.by import By

    driver: Any = browser
    key = f"page-{uuid.uuid4().hex[:8]}"
    stack.redis().set(blocked_key(key), 1)
    failed = tasks_operations.fails_while_blocked.delay(key=key, payload={"order": 42})
    with pytest.raises(Exception):  # noqa: B017, PT011
        failed.get(timeout=WAIT)

    def page_lists_it() -> bool:
        driver.get(f"{api}/background/")
        return failed.id in driver.find_element(By.ID, "dead-letters").text

    wait_for(page_lists_it, "the dead letter on the page")
    groups = driver.find_element(By.ID, "groups").text
    assert "tests.ops.fails_while_blocked" in groups
    assert "NonRetriableTaskError" in groups
    assert driver.find_element(By.ID, "queues").text
    screenshot(driver, "overview-with-a-dead-letter")

    driver.find_element(By.LINK_TEXT, failed.id).click()
    assert text_after_click(driver, "error-message") == f"{key} is blocked"
    assert '"order": 42' in driver.find_element(By.ID, "arguments").text
    assert "NonRetriableTaskError" in driver.find_element(By.ID, "traceback").text
    screenshot(driver, "dead-letter")

    stack.redis().delete(blocked_key(key))  # the cause is fixed
    driver.find_element(By.ID, "replay").click()
    message = text_after_click(driver, "message")
    match = re.search(r"as ([0-9a-f-]{36})", message)
    assert match, message
    new_id = match.group(1)
    assert AsyncResult(new_id, app=celery_app).get(timeout=WAIT)["status"] == "success"
    assert new_id in driver.find_element(By.ID, "replayed-as").text
    assert not driver.find_elements(By.ID, "replay")  # no second click
    screenshot(driver, "dead-letter-replayed")


def test_cancel_a_running_task_from_the_page(api: str, browser: Any, stack: Services) -> None:
    from selenium.webdriver.common.by import By

    driver: Any = browser
    key = f"page-{uuid.uuid4().hex[:8]}"
    running = tasks_operations.write_then_wait.delay(key=key, seconds=60)

    def page_shows_it() -> bool:
        driver.get(f"{api}/background/")
        rows = driver.find_elements(By.CSS_SELECTOR, "#running tr")
        return any(running.id in row.text for row in rows)

    wait_for(page_shows_it, "the running task on the page")
    screenshot(driver, "overview-with-a-running-task")
    row = next(
        r for r in driver.find_elements(By.CSS_SELECTOR, "#running tr") if running.id in r.text
    )
    row.find_element(By.NAME, "cancel").click()
    assert "revoked" in text_after_click(driver, "message")
    wait_for(lambda: running.state == "REVOKED", "the task revoked")

    def gone_from_the_page() -> bool:
        driver.get(f"{api}/background/")
        return running.id not in driver.find_element(By.TAG_NAME, "body").text

    wait_for(gone_from_the_page, "the cancelled task no longer running", timeout=15)
