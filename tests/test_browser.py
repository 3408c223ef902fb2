"""The whole loop in a real browser: train, watch, chat, compare, vote, export.

Playwright drives Debian's chromium (headless) against `python app.py` on a free port, with
run folders and the ratings store in a temporary folder. It starts a tiny SFT run from the
Train form, waits for it to finish in the Runs tab with a plotted loss, chats two turns with
the result through a real `python -m serving` (the app starts it), casts an A/B vote in the
arena (and a thumbs-up in the chat), finds the A/B vote in the exported preference file, and
hands the votes to the reward-model form. A second browser session sees none of the chat. A screenshot of each tab goes to
test-artifacts/ (`make test` keeps them; look at them).

`make test` installs chromium (apt) and the `playwright` package; without them this skips.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from chat.server import free_port
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"  # git-ignored
RUN_NAME = "browser-sft"

pytestmark = pytest.mark.slow


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: `make test` installs it (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="`make test` installs playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        yield browser
        browser.close()


@pytest.fixture
def app_url(tmp_path):
    """`python app.py` in its own process group (the inference servers it starts join it)."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "RLHF_HOME": str(tmp_path / "home"),
           "RLHF_RUNS_DIR": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    (tmp_path / "runs").mkdir()
    log = open(tmp_path / "app.log", "wb")
    app = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and app.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail(f"the app did not start: {(tmp_path / 'app.log').read_text()[-2000:]}")
    yield url
    os.killpg(app.pid, signal.SIGTERM)  # the app and every inference server it started
    try:
        app.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(app.pid, signal.SIGKILL)
    log.close()


def fill(page, elem_id: str, value) -> None:
    """Type into a Gradio textbox or number field and leave it (which commits the value)."""
    field = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    field.fill(str(value))
    field.press("Tab")


def choose(page, elem_id: str, value: str) -> None:
    """Pick `value` in a Gradio dropdown (typing it: the dropdowns accept typed paths)."""
    field = page.locator(f"#{elem_id} input").first
    field.click()
    field.fill(value)
    field.press("Enter")
    field.press("Tab")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def train_tiny_sft(page, expect, run_folder: Path, tiny_model: Path) -> None:
    fill(page, "sft-zero_stage", 9)  # a bad value first: a message beside the form, no traceback
    page.get_by_role("button", name="Show command").first.click()
    expect(page.locator("#sft-message")).to_contain_text("--zero-stage 9 is out of range")
    for elem_id, value in (("sft-zero_stage", 0), ("sft-model", tiny_model),
                           ("sft-output", run_folder), ("sft-max_steps", 3), ("sft-batch_size", 4),
                           ("sft-max_seq_len", 256), ("sft-eval_every", 0), ("sft-save_every", 0),
                           ("sft-learning_rate", 0.001)):
        fill(page, elem_id, value)
    page.locator("#sft-start").click()
    expect(page.locator("#sft-message")).to_contain_text(f"Started {run_folder}", timeout=30_000)
    shot(page, "1-train")


def watch_run(page, expect) -> None:
    page.get_by_role("tab", name="Runs").click()
    field = page.locator("#runs-pick input").first
    field.click()
    field.fill(RUN_NAME)
    page.get_by_role("option", name=RUN_NAME).click()
    expect(page.locator("#runs-progress")).to_contain_text("done, step 3 of 3", timeout=600_000)
    # a drawn line (a path through at least two points) and its legend entry
    expect(page.locator("#runs-plot g.mark-line path[d*='L']").first).to_be_visible(timeout=30_000)
    expect(page.locator("#runs-plot")).to_contain_text("loss")
    shot(page, "2-runs")


def chat_two_turns(page, expect, checkpoint: str) -> None:
    page.get_by_role("tab", name="Chat").click()
    choose(page, "chat-model", checkpoint)
    for turn, message in enumerate(("Hello! Who are you?", "Tell me more, please.")):
        fill(page, "chat-input", message)
        page.locator("#chat-send").click()
        # the answer's first piece clears the note, so the note that follows is this turn's
        expect(page.locator("#chat-bot [data-testid='bot']")).to_have_count(turn + 1,
                                                                          timeout=600_000)
        expect(page.locator("#chat-note")).to_contain_text(f"Answered by {checkpoint}",
                                                           timeout=600_000)
    expect(page.locator("#chat-bot")).to_contain_text("Tell me more, please.")
    page.locator("#chat-bot button[aria-label='Like']").last.click()
    expect(page.locator("#chat-note")).to_contain_text("Saved thumbs up", timeout=30_000)
    shot(page, "3-chat")


def another_session_has_its_own_chat(browser, expect, url: str) -> None:
    other = browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(url)
    other.get_by_role("tab", name="Chat").click()
    expect(other.locator("#chat-input textarea")).to_be_visible()
    expect(other.locator("#chat-bot [data-testid='bot']")).to_have_count(0)
    other.close()


def compare_and_vote(page, expect, checkpoint: str) -> tuple[str, str]:
    page.get_by_role("tab", name="Compare").click()
    choose(page, "compare-model-1", checkpoint)
    fill(page, "compare-input", "Name three colours.")
    page.locator("#compare-send").click()
    expect(page.locator("#compare-note")).to_contain_text("Which answer is better?", timeout=600_000)
    answer_a = page.locator("#compare-a [data-testid='bot']").last.inner_text()
    answer_b = page.locator("#compare-b [data-testid='bot']").last.inner_text()
    assert answer_a != answer_b  # two samples with their own seeds
    page.locator("#vote-A").click()
    expect(page.locator("#compare-note")).to_contain_text("Vote saved (A)")
    expect(page.locator("#compare-note")).to_contain_text(f"A was {checkpoint}")
    shot(page, "4-compare")
    return answer_a, answer_b


def export_votes(page, expect) -> Path:
    page.get_by_role("tab", name="Ratings").click()
    expect(page.locator("#ratings-counts")).to_contain_text("2 votes: 1 A", timeout=30_000)
    expect(page.locator("#ratings-counts")).to_contain_text("1 up")
    page.locator("#ratings-export").click()
    expect(page.locator("#ratings-note")).to_contain_text("Wrote 1 preference records", timeout=30_000)
    shot(page, "5-ratings")
    note = page.locator("#ratings-note").inner_text()
    return Path(note.split(" to ", 1)[1].split(" (", 1)[0].strip().strip("`"))


def hand_votes_to_the_rm_form(page, expect) -> None:
    page.get_by_role("button", name="Train a reward model on these").click()
    expect(page.locator("#rm-data")).to_contain_text("ratings:")
    expect(page.locator("#rm-data")).to_contain_text("prompts/preferences.jsonl")
    expect(page.locator("#rm-output textarea")).to_have_value(re.compile(r"rm-ratings$"))
    shot(page, "6-train-rm-from-ratings")


def test_train_watch_chat_compare_vote_export(browser, app_url, tmp_path, tiny_model):
    from playwright.sync_api import expect

    run_folder = tmp_path / "runs" / RUN_NAME
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url)
    train_tiny_sft(page, expect, run_folder, tiny_model)
    watch_run(page, expect)
    assert (run_folder / "final" / "config.json").is_file()
    checkpoint = str(run_folder / "final")
    chat_two_turns(page, expect, checkpoint)
    another_session_has_its_own_chat(browser, expect, app_url)
    expect(page.locator("#chat-bot [data-testid='bot']")).to_have_count(2)
    answer_a, answer_b = compare_and_vote(page, expect, checkpoint)
    exported = export_votes(page, expect)
    hand_votes_to_the_rm_form(page, expect)
    [record] = [json.loads(line) for line in exported.read_text().splitlines()]
    assert record["verdict"] == "A" and record["chosen_model"] == checkpoint
    assert record["prompt"][-1] == {"role": "user", "content": "Name three colours."}
    assert record["chosen"].split() == answer_a.split() and record["rejected"].split() == answer_b.split()
