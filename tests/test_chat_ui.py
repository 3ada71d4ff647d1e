"""The chat flow as people use it interactively: the Prompt Flow chat page (`pf flow test --ui`) driven in headless
Chromium, and the flow served as an app (`pf flow serve`), both against a scripted endpoint that records each request.

Chromium and chromedriver come from Debian (`make install-browser`, which CI runs as root); without them the browser
tests skip locally and fail under CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import requests

from conftest import REPO, SECRET, PromptFlowHome, Reply, ScriptedEndpoint
from phi3flow.serve import free_port

pytestmark = pytest.mark.e2e
ARTIFACTS = REPO / "test-artifacts"  # screenshots and the pf commands' logs (gitignored)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
FETCH_FAILED = "Failed to fetch"  # the page's words when the serving app did not answer at all
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon", "Greece": "Athens"}


def wait_until(condition, timeout: float, what: str):
    """Poll `condition()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def capital_endpoint(port: int = 0) -> ScriptedEndpoint:
    """Answers "...<country>?" with its capital; `refuse_key` makes it answer 401, as an endpoint does to a wrong key."""
    server: ScriptedEndpoint

    def respond(body: dict) -> Reply:
        if server.refuse_key:
            return Reply(401, {"message": "Invalid authentication token"})
        question = body["input_data"]["input_string"][-1]["content"]
        country = next((name for name in CAPITALS if name in question), None)
        return Reply(body={"output": f"The capital of {country} is {CAPITALS[country]}." if country else "I do not know."})

    server = ScriptedEndpoint(port, responder=respond)
    server.refuse_key = False
    return server


@pytest.fixture(scope="module")
def pf_home(tmp_path_factory):
    home = PromptFlowHome(tmp_path_factory.mktemp("pf-home"), Path(sys.executable).parent)
    yield home
    home.close()


@pytest.fixture(scope="module")
def chat_flow(tmp_path_factory) -> Path:
    """flows/chat as committed, in a folder of its own: the chat page keeps its conversation in the flow folder
    (.promptflow/ux.inputs.json), which must start empty and must not clash with another test run in this checkout."""
    folder = tmp_path_factory.mktemp("flow") / "chat"
    shutil.copytree(REPO / "flows/chat", folder, ignore=shutil.ignore_patterns(".promptflow", "__pycache__", "*.whl"))
    return folder


@pytest.fixture(scope="module")
def capitals(pf_home):
    """The scripted endpoint behind the `phi3_endpoint` connection; a test may stop it and start it again on its port."""
    state = {"server": capital_endpoint()}
    pf_home.connect(state["server"].url)
    yield state
    state["server"].close()


# ---- the flow served as an app -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_flow(pf_home, chat_flow, capitals):
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "pf-flow-serve.log"
    process = pf_home.spawn(
        "pf",
        "flow",
        "serve",
        "--source",
        str(chat_flow),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--skip-open-browser",
        log=log,
    )

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok
        except requests.ConnectionError:
            return False

    wait_until(healthy, 180, "pf flow serve to answer /health")
    return f"http://127.0.0.1:{port}/score"


def test_pf_flow_serve_answers_with_history(served_flow, capitals):
    history = [
        {"inputs": {"input_data": "What is the capital of France?"}, "outputs": {"answer": "The capital of France is Paris."}}
    ]
    response = requests.post(served_flow, json={"input_data": "And of Italy?", "chat_history": history}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json() == {"answer": "The capital of Italy is Rome."}
    assert capitals["server"].requests[-1]["body"]["input_data"]["input_string"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert capitals["server"].requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_pf_flow_serve_reports_the_tools_error_when_the_key_is_refused(served_flow, capitals):
    capitals["server"].refuse_key = True
    try:
        response = requests.post(served_flow, json={"input_data": "And of Spain?", "chat_history": []}, timeout=120)
    finally:
        capitals["server"].refuse_key = False
    assert response.status_code == 400, response.text  # a user error (the tool's), not a server crash
    assert "the endpoint refused the key (HTTP 401): check the connection's key" in response.text
    assert "Traceback" not in response.text and SECRET not in response.text
    assert SECRET not in (ARTIFACTS / "pf-flow-serve.log").read_text()


# ---- the chat page of `pf flow test --ui` in headless Chromium ------------------------------------------------------


class ChatUi:
    """A running `pf flow test --ui`: the chat page's URL and the flow's serving app behind it (restarted by pf's monitor)."""

    def __init__(self, process: subprocess.Popen, log: Path, app_port: int, flow: Path) -> None:
        self.process, self.log, self.app_port = process, log, app_port
        self.ux_inputs = flow / ".promptflow" / "ux.inputs.json"  # where the page keeps the conversation
        self.url = ""

    def restarts(self) -> int:
        return self.log.read_text().count("Changes detected, stopping current serve app...")

    def _serving(self) -> bool:
        output = self.log.read_text()
        assert self.process.poll() is None and "inherited across fork" not in output, output[-3000:]
        if output.rfind("Starting serve app...") > output.rfind(f"Running on http://localhost:{self.app_port}"):
            return False  # a (re)start is under way
        try:
            return requests.get(f"http://127.0.0.1:{self.app_port}/health", timeout=2).ok
        except requests.ConnectionError:
            return False

    def wait_started(self) -> str:
        def started() -> str | None:
            url = re.search(r"Chat page URL will be available after service is started: (\S+)", self.log.read_text())
            return url and self._serving() and url.group(1)

        self.url = wait_until(started, 180, "the chat page's serving app (pf flow test --ui) to answer /health")
        return self.url

    def wait_settled(self, quiet: float = 1.5) -> None:
        """Wait until the serving app has been up, unchanged, for `quiet` seconds.

        promptflow 1.18.5's monitor re-reads ux.inputs.json while the page's own save (on each send and answer)
        rewrites it, and now and then takes the half-written file for a change of the flow: it restarts the serving
        app, and the request in flight, or one sent in the next seconds, gets "Failed to fetch"."""
        last, since = None, time.monotonic()

        def settled() -> bool:
            nonlocal last, since
            output = self.log.read_text()
            state = (output.count("Starting serve app..."), self.ux_inputs.stat().st_mtime if self.ux_inputs.exists() else None)
            if state != last or not self._serving():
                last, since = state, time.monotonic()
                return False
            return time.monotonic() - since >= quiet

        wait_until(settled, 120, "the chat page's serving app to settle")


@pytest.fixture(scope="module")
def chat_ui(pf_home, chat_flow, capitals) -> ChatUi:
    """`pf flow test --flow flows/chat --ui`, its serving app up."""
    pf_home.start_service()  # on a free port; `--ui` finds it through the PF home
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "chat_ui_failure.png").unlink(missing_ok=True)  # only this run's failure, if any
    log, app_port = ARTIFACTS / "pf-flow-test-ui.log", free_port()
    process = pf_home.spawn(
        "pf", "flow", "test", "--flow", str(chat_flow), "--ui", "--skip-open-browser", "--port", str(app_port), log=log
    )
    ui = ChatUi(process, log, app_port, chat_flow)
    ui.wait_started()
    return ui


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = f"{CHROMIUM} and {CHROMEDRIVER} are needed: run `make install-browser` as root (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="phi3flow-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class ChatPage:
    """The Prompt Flow chat page: a Lexical message box, a Send button, the conversation as text."""

    def __init__(self, driver, ui: ChatUi) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.by, self.ui = driver, By, ui
        driver.get(ui.url)
        wait_until(
            lambda: driver.find_elements(By.CSS_SELECTOR, "[data-lexical-editor='true'][contenteditable='true']"),
            60,
            "the chat page's message box",
        )

    def text(self) -> str:
        return self.driver.find_element(self.by.TAG_NAME, "body").text

    def send(self, message: str, expect: str, timeout: float = 90) -> str:
        """Type `message`, press Send, and wait until `expect` shows (once more) in the conversation; return the page's text.

        It is sent again (at most twice) only after promptflow 1.18.5's own race (see ChatUi.wait_settled): pf
        restarted the serving app under the request and the page says "Failed to fetch". Anything else fails."""
        for _ in range(3):
            self.ui.wait_settled()
            seen, failed, restarts = self.text().count(expect), self.text().count(FETCH_FAILED), self.ui.restarts()
            box = self.driver.find_element(self.by.CSS_SELECTOR, "[data-lexical-editor='true'][contenteditable='true']")
            box.click()
            box.send_keys(message)
            self.driver.find_element(self.by.CSS_SELECTOR, "button[title='Send']").click()
            try:
                text = wait_until(
                    lambda seen=seen, failed=failed: (
                        (self.text().count(expect) > seen or self.text().count(FETCH_FAILED) > failed) and self.text()
                    ),
                    timeout,
                    f"{expect!r} on the chat page after sending {message!r}",
                )
            except pytest.fail.Exception:
                self.screenshot("chat_ui_failure.png")
                raise
            if text.count(expect) > seen:
                return text
            if self.ui.restarts() == restarts:
                self.screenshot("chat_ui_failure.png")
                pytest.fail(f"the page could not reach the flow's serving app after {message!r}, and pf did not restart it")
            warnings.warn(
                f"pf restarted the chat page's serving app under {message!r} (promptflow 1.18.5's monitor race): sent again",
                stacklevel=2,
            )
        pytest.fail(f"{message!r}: the serving app was restarted under every try")

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.driver.save_screenshot(str(ARTIFACTS / name))


@pytest.fixture(scope="module")
def page(browser, chat_ui) -> ChatPage:
    return ChatPage(browser, chat_ui)


def test_chat_page_answers_two_turns_and_sends_the_history(page, capitals):
    server = capitals["server"]
    asked = len(server.requests)
    page.send("What is the capital of France?", "The capital of France is Paris.")
    text = page.send("And of Italy?", "The capital of Italy is Rome.")
    page.screenshot("chat_ui.png")
    assert (
        text.index("What is the capital of France?")
        < text.index("The capital of France is Paris.")
        < text.index("And of Italy?")
        < text.index("The capital of Italy is Rome.")
    )
    first, second = (request["body"]["input_data"]["input_string"] for request in server.requests[asked:])
    assert first == [{"role": "user", "content": "What is the capital of France?"}]
    assert second == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]


def test_chat_page_shows_the_tools_error_then_recovers(page, capitals):
    """Endpoint down, then a refused key: the page shows the tool's own message, no stack trace; the next message works."""
    server = capitals["server"]
    port = server.server.server_address[1]
    server.close()
    text = page.send("And of Spain?", f"cannot reach 127.0.0.1:{port}", timeout=150)
    assert "is the endpoint running and the URL right?" in text
    capitals["server"] = server = capital_endpoint(port)  # the endpoint is back
    text = page.send("And of Portugal?", "The capital of Portugal is Lisbon.")

    server.refuse_key = True
    text = page.send("And of Greece?", "the endpoint refused the key (HTTP 401): check the connection's key")
    server.refuse_key = False
    text = page.send("And of Spain, again?", "The capital of Spain is Madrid.")
    page.screenshot("chat_ui_errors.png")
    assert "Traceback" not in text and 'File "' not in text and SECRET not in text
    assert SECRET not in page.ui.log.read_text()
    turns = [message["content"] for message in server.requests[-1]["body"]["input_data"]["input_string"]]
    assert turns[-3:] == ["And of Portugal?", "The capital of Portugal is Lisbon.", "And of Spain, again?"]
    assert "And of Spain?" not in turns and "And of Greece?" not in turns  # failed turns are not sent as history
