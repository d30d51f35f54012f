"""chat.py as a person meets it: driven through a pseudo-terminal (pexpect), not a pipe, so readline, bracketed
paste, Ctrl-C and Ctrl-D behave as in a real terminal. Each session's transcript is kept (`SESSION_LOG` or the
test's tmp folder); tests/sessions/chat_terminal.txt is one such recording, for a person to read. Issue #26 item 1,
issue #25 item 12."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, clean_env

from lightning_moe.generation.prompts import read_prompts

pexpect = pytest.importorskip("pexpect")

WORDS = "I feel sad today and cannot sleep because of my exams, so I keep thinking about them all night".split()


def spawn(trained_run, log, *args):
    child = pexpect.spawn(sys.executable, [str(REPO / "chat.py"), f"run={trained_run}", *args], cwd=str(REPO),
                          env=clean_env(TERM="xterm"), encoding="utf-8", codec_errors="replace", timeout=240,
                          dimensions=(40, 200))
    child.logfile_read = log
    return child


def paste(child, text: str) -> None:
    """A terminal paste: bracketed-paste markers around the text, fed in pieces while the echo is drained (a pty's
    buffers are a few KiB)."""
    data = f"\x1b[200~{text}\x1b[201~"
    for i in range(0, len(data), 512):
        child.send(data[i:i + 512])
        try:
            while child.read_nonblocking(65536, timeout=0.05):
                pass
        except (pexpect.TIMEOUT, pexpect.EOF):
            pass
    child.send("\r")


def stop_reply(child) -> None:
    child.expect_exact("assistant> ")
    child.sendintr()  # Ctrl-C while the reply streams
    child.expect_exact("(stopped by Ctrl-C; what was said stays in the conversation)")
    child.expect_exact("you> ")


@pytest.mark.slow
def test_chat_in_a_terminal_edits_pastes_stops_saves_and_ends_cleanly(trained_run, tmp_path):
    """README "python chat.py run=runs/a: talk to it": the Up arrow recalls the last message (it reached the model
    as ^[[A before), a 10,847-character paste of several lines arrives whole (it was cut to 4,096 silently), Ctrl-C
    stops a streaming reply and keeps the conversation (it was a traceback that lost it), /help lists the commands,
    /save writes a `messages` row generate.py reads, Ctrl-D ends on a fresh line."""
    block = "\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(200))[:10847]
    assert len(block) == 10847
    saved = tmp_path / "conversation.jsonl"
    with open(os.environ.get("SESSION_LOG", tmp_path / "session.txt"), "w") as log:
        child = spawn(trained_run, log, "max_new_tokens=600")
        child.expect_exact("you> ")
        child.send("hello\r")
        stop_reply(child)
        child.send("\x1b[A\r")  # Up arrow, Enter: the same message again
        stop_reply(child)
        paste(child, block)
        stop_reply(child)
        child.send("/help\r")
        child.expect_exact("/save FILE")
        child.expect_exact("you> ")
        child.send(f"/save {saved}\r")
        child.expect_exact("(saved 6 turns")
        child.expect_exact("you> ")
        child.sendeof()  # Ctrl-D
        child.expect(r"\n\(end of conversation, 3 replies\)")  # on a line of its own, not after "you> "
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "hello", block]
    row = {"messages": [*messages, {"role": "user", "content": "and now?"}]}
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    assert read_prompts(tmp_path / "p.jsonl")[0]["messages"][4]["content"] == block  # generate.py's reader


@pytest.mark.slow
def test_chat_skips_undecodable_input_and_ctrl_c_at_the_prompt_ends_cleanly(trained_run, tmp_path):
    """Issue #25 item 12 (README: chat.py talks until the input ends): a Latin-1 line or binary bytes ended the
    session with a TypeError and the conversation was lost; a closed stdin raised AttributeError. Undecodable input
    is named and skipped, the conversation goes on; Ctrl-C at the prompt exits without a traceback."""
    with open(tmp_path / "session.txt", "w") as log:
        child = spawn(trained_run, log, "max_new_tokens=3")
        child.expect_exact("you> ")
        os.write(child.child_fd, "caf\xe9 cr\xe8me\r".encode("latin-1"))  # a Latin-1 line, as raw bytes
        child.expect_exact("is not UTF-8 text: skipped; the conversation goes on")
        child.send("hello\r")
        child.expect_exact("assistant> ")
        child.expect_exact("you> ")
        child.sendintr()
        child.expect_exact("(end of conversation, 1 replies)")
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 0 and "Traceback" not in (tmp_path / "session.txt").read_text()

    piped = subprocess.run([sys.executable, str(REPO / "chat.py"), f"run={trained_run}", "max_new_tokens=3"], cwd=REPO,
                           env=clean_env(), input=b"\xff\xfe\x00binary\ncaf\xe9\nhello\n", capture_output=True,
                           timeout=300)
    text = piped.stdout.decode()
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "input line 1 is not UTF-8 text" in text and "input line 2 is not UTF-8 text" in text
    assert "(end of conversation, 1 replies)" in text

    closed = subprocess.run(f"{sys.executable} {REPO / 'chat.py'} run={trained_run} 0<&-", shell=True, cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert closed.returncode == 2 and "error: stdin: chat.py reads the conversation from its input, which is closed" \
        in closed.stderr, closed.stderr[-2000:]
