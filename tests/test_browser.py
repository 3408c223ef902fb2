"""A newcomer's whole loop in a real browser, with no typed path and no flag name: train SFT, a
reward model and PPO from the forms' pickers; watch them queue and finish in the Runs tab; chat
three turns (typing on while an answer streams); stop and resume a run; compare two checkpoints
and vote; undo a vote; train a reward model on the votes; reload and find the picked run again.
And one round of the loop (issue 17): sample pairs from a checkpoint, vote on each, train DPO
on the votes, find the new checkpoint in Chat and Compare, and the rounds side by side on the
leaderboard.

Playwright drives Debian's chromium (headless) against `python app.py` on a free port, with run
folders and the ratings store in a temporary folder. The tiny random model reaches the pickers
the way a user's own model would: it sits in $RLHF_HOME/models. A screenshot of each step goes
to test-artifacts/ (`make test` keeps them; look at them).

`make test` installs chromium (apt) and the `playwright` package; without them this skips.
"""
from __future__ import annotations

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
TINY = "tiny-llama (models folder)"
LONG = 600_000  # ms: a step that trains or starts a server on a loaded 2-core machine

pytestmark = pytest.mark.slow


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: `make test` installs it (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="`make test` installs playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True, timeout=300_000)
        yield browser
        browser.close()


@pytest.fixture
def app_url(tmp_path, tiny_model):
    """`python app.py` in its own process group (the inference servers it starts join it)."""
    port = free_port()
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny-llama").symlink_to(tiny_model)
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "RLHF_HOME": str(home),
           "RLHF_RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    (tmp_path / "runs").mkdir()
    log = open(tmp_path / "app.log", "wb")
    app = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and app.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=5)
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
    """Type a number or a message into a field and leave it (which commits the value)."""
    field = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    field.fill(str(value))
    field.press("Tab")


def pick(page, elem_id: str, option: str) -> None:
    """Open a dropdown and click one of the options it offers (nothing typed)."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).first.click()
    page.keyboard.press("Escape")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_form(page, step_tab: str) -> None:
    page.get_by_role("tab", name="Train", exact=True).click()
    page.get_by_role("tab", name=step_tab, exact=True).click()


def watch(page, expect, run: str, state, timeout: int = LONG) -> None:
    """Pick `run` in the Runs tab and wait until its progress line shows `state` (a text or a
    pattern)."""
    page.get_by_role("tab", name="Runs", exact=True).click()
    pick(page, "runs-pick", run)
    pattern = state.pattern if isinstance(state, re.Pattern) else re.escape(state)
    expect(page.locator("#runs-progress")).to_contain_text(re.compile(rf"{run} \(\w+\): {pattern}"),
                                                           timeout=timeout)


def train_sft(page, expect) -> None:
    """Item 1: groups, words, a value refused beside its field; the summary line."""
    open_form(page, "SFT")
    pick(page, "sft-model", TINY)
    fill(page, "sft-max_steps", 2.7)
    page.locator("#sft-start").click()
    expect(page.locator("#sft-max_steps")).to_contain_text("2.7 is not a whole number")
    expect(page.locator("#sft-message")).to_contain_text("Not started")
    shot(page, "01-form-refuses-2.7-beside-the-field")
    for elem_id, value in (("sft-max_steps", 3), ("sft-batch_size", 4)):
        fill(page, elem_id, value)
    expect(page.locator("#sft-summary")).to_contain_text("SFT of tiny-llama on 95 records, ~3 steps")
    page.locator("#sft-preview").click()
    expect(page.locator("#sft-preview-box")).to_contain_text("prompts/sft.jsonl: 100 records")
    page.locator("#sft-show").click()  # the command shows beside the preview, which stays
    expect(page.locator("#sft-command")).to_contain_text("--max-steps=3")
    expect(page.locator("#sft-preview-box")).to_contain_text("prompts/sft.jsonl: 100 records")
    shot(page, "02-summary-preview-and-command")
    page.locator("#sft-start").click()
    expect(page.locator("#sft-message")).to_contain_text("Started sft1")
    shot(page, "02-sft-started")


def train_rm(page, expect) -> None:
    """Items 2 and 8: a second run waits in the queue behind the first."""
    open_form(page, "Reward model")
    pick(page, "rm-model", TINY)
    fill(page, "rm-max_steps", 3)
    fill(page, "rm-batch_size", 4)
    page.locator("#rm-start").click()
    expect(page.locator("#rm-message")).to_contain_text("Started rm1")
    page.get_by_role("tab", name="Runs", exact=True).click()
    expect(page.locator("#runs-queue")).to_contain_text("waiting: rm1", timeout=60_000)
    expect(page.locator("#runs-table")).to_contain_text("queued (1st in line)")
    shot(page, "03-runs-queue")


def train_ppo(page, expect) -> None:
    """Items 2 and 4: the reward model is required and picked from finished reward runs."""
    open_form(page, "PPO")
    page.locator("#ppo-start").click()
    expect(page.locator("#ppo-reward")).to_contain_text("Required: pick one from the list")
    shot(page, "05-ppo-reward-required")
    pick(page, "ppo-actor", "sft1/final (finished run)")
    pick(page, "ppo-reward", "rm1/final (reward model)")
    for elem_id, value in (("ppo-max_steps", 2), ("ppo-rollout_batch_size", 4), ("ppo-batch_size", 4),
                           ("ppo-max_new_tokens", 16)):
        fill(page, elem_id, value)
    page.locator("#ppo-ema input[type=checkbox]").check()
    expect(page.locator("#ppo-summary")).to_contain_text("PPO of sft1/final against rm1/final")
    page.locator("#ppo-start").click()
    expect(page.locator("#ppo-message")).to_contain_text("Started ppo1")


def chat_three_turns(page, expect) -> None:
    """Items 3 and 4: the list is fresh, typing survives streaming, Send queues, a mark on a
    cut-off answer, Stop only while answering."""
    page.get_by_role("tab", name="Chat", exact=True).click()
    pick(page, "chat-model", "sft1/final (finished run)")
    for turn, message in enumerate(("Hello! Who are you?", "Tell me more.", "What did I ask first?")):
        fill(page, "chat-input", message)
        page.locator("#chat-send").click()
        if turn == 0:  # typed while the first answer comes: the pieces never wipe it
            expect(page.locator("#chat-send")).to_have_text("Queue", timeout=LONG)
            expect(page.locator("#chat-stop")).to_be_enabled()
            page.locator("#chat-input textarea").type("draft")
            shot(page, "06-chat-typing-while-answering")
            expect(page.locator("#chat-bot [data-testid='bot']")).to_have_count(1, timeout=LONG)
        expect(page.locator("#chat-note")).to_contain_text("Answered by sft1/final", timeout=LONG)
        expect(page.locator("#chat-bot [data-testid='bot']")).to_have_count(turn + 1)
        if turn == 0:
            expect(page.locator("#chat-input textarea")).to_have_value("draft")
            expect(page.locator("#chat-send")).to_have_text("Send")
    expect(page.locator("#chat-stop")).to_be_disabled()
    expect(page.locator("#chat-bot")).to_contain_text("cut off at the token limit")
    page.locator("#chat-bot button[aria-label='Like']").last.click()
    expect(page.locator("#chat-note")).to_contain_text("Saved thumbs up", timeout=30_000)
    shot(page, "07-chat-three-turns")


def stop_and_resume(page, expect) -> None:
    """Item 6: Stop shows stopping at once, the buttons follow the run's state, Resume goes on."""
    open_form(page, "SFT")
    pick(page, "sft-model", TINY)
    for elem_id, value in (("sft-output", "long"), ("sft-max_steps", 400), ("sft-batch_size", 2)):
        fill(page, elem_id, value)
    page.locator("#sft-start").click()
    expect(page.locator("#sft-message")).to_contain_text("Started long")
    watch(page, expect, "long", re.compile(r"running, step [1-9]\d* of 400"))
    expect(page.locator("#runs-resume")).to_be_disabled()
    page.locator("#runs-stop").click()
    expect(page.locator("#runs-progress")).to_contain_text("stopping…", timeout=5_000)
    shot(page, "08-runs-stopping")
    expect(page.locator("#runs-progress")).to_contain_text("stopped", timeout=LONG)
    expect(page.locator("#runs-resume")).to_be_enabled()
    expect(page.locator("#runs-stop")).to_be_disabled()
    stopped_at = int(re.search(r"step (\d+) of 400", page.locator("#runs-progress").inner_text())[1])
    page.locator("#runs-resume").click()
    expect(page.locator("#runs-note")).to_contain_text("long resumed")
    expect(page.locator("#runs-log textarea")).to_have_value(
        re.compile(f"resumed from step {stopped_at}"), timeout=LONG)
    page.locator("#runs-stop").click()  # seen it go on: stop it for good
    expect(page.locator("#runs-progress")).to_contain_text("stopped", timeout=LONG)


def compare_and_vote(page, expect) -> tuple[str, str]:
    """Item 7: both sides stream at once, the names show on the panels, the buttons lock."""
    page.get_by_role("tab", name="Compare", exact=True).click()
    page.get_by_text("two checkpoints", exact=True).click()
    pick(page, "compare-model-1", "sft1/final (finished run)")
    pick(page, "compare-model-2", "ppo1/ema (finished run)")
    expect(page.locator("#vote-A")).to_be_disabled()
    fill(page, "compare-input", "Name three colours.")
    page.locator("#compare-send").click()
    expect(page.locator("#compare-note")).to_contain_text("Which answer is better?", timeout=LONG)
    answer_a = page.locator("#compare-a [data-testid='bot']").last.inner_text()
    answer_b = page.locator("#compare-b [data-testid='bot']").last.inner_text()
    page.locator("#vote-A").click()
    expect(page.locator("#compare-note")).to_contain_text("Vote saved (A)")
    expect(page.locator("#compare-a")).to_contain_text(re.compile(r"A: (sft1/final|ppo1/ema) \(seed"))
    expect(page.locator("#compare-b")).to_contain_text(re.compile(r"B: (sft1/final|ppo1/ema) \(seed"))
    expect(page.locator("#vote-B")).to_be_disabled()
    shot(page, "10-compare-revealed-and-locked")
    return answer_a, answer_b


def undo_and_train_on_votes(page, expect) -> None:
    """Item 7: a vote is undone from the Ratings tab; the votes train a reward model."""
    page.get_by_role("tab", name="Ratings", exact=True).click()
    expect(page.locator("#ratings-counts")).to_contain_text("2 votes: 1 A", timeout=30_000)
    expect(page.locator("#ratings-counts")).to_contain_text("1 up")
    expect(page.locator("#ratings-table")).to_contain_text("Name three colours.")
    pick(page, "ratings-vote", "#1 up: What did I ask first?")  # the thumb: cast by mistake
    page.locator("#ratings-undo").click()
    expect(page.locator("#ratings-note")).to_contain_text("Vote #1 undone")
    expect(page.locator("#ratings-counts")).to_contain_text("1 vote: 1 A, 0 B, 0 tie, 0 both_bad, 0 up")
    shot(page, "11-ratings-vote-undone")
    page.locator("#ratings-train-rm").click()
    expect(page.locator("#rm-data")).to_contain_text("ratings:")
    pick(page, "rm-model", TINY)
    fill(page, "rm-max_steps", 2)
    fill(page, "rm-batch_size", 2)
    page.locator("#rm-start").click()
    expect(page.locator("#rm-message")).to_contain_text("Started rm2")
    watch(page, expect, "rm2", "done, step 2 of 2")


def test_a_newcomers_whole_loop(browser, app_url, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(app_url)
    train_sft(page, expect)
    train_rm(page, expect)
    watch(page, expect, "sft1", "done, step 3 of 3")
    expect(page.locator("#runs-plots svg[data-metric='loss'] circle").first).to_be_visible()
    expect(page.locator("#runs-steps textarea")).to_have_value(re.compile(r"step 3/3: loss"))
    shot(page, "04-runs-sft-plots")
    watch(page, expect, "rm1", "done, step 3 of 3")
    train_ppo(page, expect)
    chat_three_turns(page, expect)
    watch(page, expect, "ppo1", "done, step 2 of 2")
    expect(page.locator("#runs-samples")).to_contain_text("→")
    expect(page.locator("#runs-plots svg[data-metric='reward']")).to_be_visible()
    shot(page, "09-runs-ppo-samples")
    stop_and_resume(page, expect)
    answer_a, answer_b = compare_and_vote(page, expect)
    undo_and_train_on_votes(page, expect)
    page.reload()
    page.get_by_role("tab", name="Runs", exact=True).click()
    expect(page.locator("#runs-progress")).to_contain_text("rm2", timeout=30_000)  # kept
    shot(page, "12-reload-keeps-the-picked-run")

    assert "data ratings:" in (tmp_path / "runs" / "rm2" / "train.log").read_text()  # the votes
    console = (tmp_path / "app.log").read_text()
    for line in ("run sft1 started (sft)", "run sft1 done", "run rm1 running", "inference server "
                 "started on http://127.0.0.1:", "run long asked to stop", "run rm2 done"):
        assert line in console, console[-3000:]
    assert answer_a and answer_b


ROUND_VERDICTS = ("A", "B", "both_bad", "A")


def vote_between_checkpoints(page, expect, first: str, second: str, message: str) -> None:
    """One Compare vote (A) between two checkpoints, in a new conversation."""
    page.get_by_role("tab", name="Compare", exact=True).click()
    page.get_by_role("button", name="New conversation").click()
    page.get_by_text("two checkpoints", exact=True).click()
    pick(page, "compare-model-1", first)
    pick(page, "compare-model-2", second)
    fill(page, "compare-input", message)
    page.locator("#compare-send").click()
    expect(page.locator("#compare-note")).to_contain_text("Which answer is better?", timeout=LONG)
    page.locator("#vote-A").click()
    expect(page.locator("#compare-note")).to_contain_text("Vote saved (A)")


def sample_and_vote(page, expect) -> list[str]:
    """Sample round 1 from the tiny model (4 prompts, short answers) and vote on every pair."""
    pick(page, "rounds-model", TINY)
    fill(page, "rounds-count", 4)
    fill(page, "rounds-max-tokens", 12)
    page.locator("#rounds-sample").click()
    done = re.compile(r"Round 1: (\d) pairs from tiny-llama wait for your votes")
    expect(page.locator("#rounds-note")).to_contain_text(done, timeout=LONG)
    queued = int(done.search(page.locator("#rounds-note").inner_text())[1])
    assert queued >= 2  # a random model's two samples of 12 tokens differ
    expect(page.locator("#rounds-waiting")).to_contain_text(f"Round 1 · waiting: {queued}")
    shot(page, "20-round-1-sampled")
    verdicts = list(ROUND_VERDICTS[:queued])
    for left, verdict in enumerate(verdicts, 1):
        expect(page.locator("#rounds-a [data-testid='bot']")).to_have_count(1)
        expect(page.locator("#rounds-b [data-testid='user']")).to_have_count(1)
        page.locator(f"#rounds-vote-{verdict}").click()
        expect(page.locator("#rounds-waiting")).to_contain_text(f"waiting: {queued - left}")
    expect(page.locator("#rounds-vote-A")).to_be_disabled()
    return verdicts


def test_one_round_of_the_loop(browser, app_url, tmp_path, tiny_model):
    """Issue 17, item 3: a vote between two checkpoints (round 0), then round 1: sample pairs,
    vote on each, train DPO on the votes, chat with the result and rank it on the leaderboard."""
    from playwright.sync_api import expect

    (tmp_path / "home" / "models" / "tiny-twin").symlink_to(tiny_model)  # a second checkpoint
    expect.set_options(timeout=60_000)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(app_url)
    vote_between_checkpoints(page, expect, TINY, "tiny-twin (models folder)", "Name three colours.")
    verdicts = sample_and_vote(page, expect)

    for elem_id, value in (("rounds-max_steps", 2), ("rounds-batch_size", 2), ("rounds-max_seq_len", 128)):
        fill(page, elem_id, value)
    page.locator("#rounds-train").click()
    expect(page.locator("#rounds-train-note")).to_contain_text("Started round1-dpo")
    swapped = "round1-dpo is done: round1-dpo/final is now the checkpoint of Chat, Compare"
    expect(page.locator("#rounds-train-note")).to_contain_text(swapped, timeout=LONG)
    final = "round1-dpo/final (finished run)"
    for picker in ("rounds-model", "compare-model-1"):
        expect(page.locator(f"#{picker} input")).to_have_value(final)
    shot(page, "21-round-1-trained-and-swapped-in")
    watch(page, expect, "round1-dpo", "done, step 2 of 2")  # a run like the others

    page.get_by_role("tab", name="Chat", exact=True).click()
    expect(page.locator("#chat-model input")).to_have_value(final)
    fill(page, "chat-input", "Hello! Who are you?")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-note")).to_contain_text("Answered by round1-dpo/final", timeout=LONG)
    expect(page.locator("#chat-bot [data-testid='bot']")).to_have_count(1)
    shot(page, "22-chat-with-the-round-1-checkpoint")

    vote_between_checkpoints(page, expect, final, TINY, "Name a fruit.")  # cast in round 1
    page.get_by_role("tab", name="Ratings", exact=True).click()
    votes = len(verdicts) + 1
    expect(page.locator("#ratings-rounds-line")).to_contain_text(
        f"Round 0: 1 vote · round 1: {votes} votes.", timeout=30_000)
    board = page.locator("#ratings-rounds")
    for text in ("round 0", "round 1", "round1-dpo/final", "tiny-twin", "· 1 game"):
        expect(board).to_contain_text(text)
    shot(page, "23-leaderboard-rounds-side-by-side")

    decisive = 1 + sum(v in ("A", "B") for v in verdicts)  # round 0's vote and round 1's A/B votes
    log = (tmp_path / "runs" / "round1-dpo" / "train.log").read_text()
    assert f"data ratings:: {decisive} records" in log, log[-2000:]
    console = (tmp_path / "app.log").read_text()
    assert "round 1 sampled" in console and "run round1-dpo swapped into Chat and Compare" in console
