"""Interactive chat: history, trimming to max_seq_len, /reset, Ctrl-C; end to end over piped stdin."""

import ast
import io
import os
import re
import signal
import subprocess
import sys

from conftest import REPO, models_path
from llama.chat import encode_dialog
from llama.interactive import ChatSession, chat_loop

TURN_RE = re.compile(r"turn (\d+): (\d+) earlier exchanges, (\d+) prompt tokens: (\[.*\])")
ANSWER_RE = re.compile(r"turn (\d+) answer: (.*)")


def run_chat(lines: list[str], *flags: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    cmd = [sys.executable, "-m", "llama.cli", "chat", "--ckpt_dir", models_path("stories260K-meta"),
           "--tokenizer_path", models_path("stories260K", "tok512.model"), "--device", "cpu",
           "--temperature", "0", "--stop_token_ids", "1", "--log_level", "debug", *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, input="".join(line + "\n" for line in lines), capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    turns = {int(m[1]): (int(m[2]), ast.literal_eval(m[4])) for m in TURN_RE.finditer(proc.stderr)}
    answers = {int(m[1]): ast.literal_eval(m[2]) for m in ANSWER_RE.finditer(proc.stderr)}
    return proc, turns, answers


def test_three_turn_session_keeps_history(stories):
    users = ["Hello there", "What did the cat do?", "And then?"]
    proc, turns, answers = run_chat(users, "--system_prompt", "Tell short stories.", "--max_gen_len", "16")
    assert sorted(turns) == sorted(answers) == [1, 2, 3]
    for n in (1, 2):
        assert answers[n] and answers[n] in proc.stdout  # streamed to the terminal
    earlier, ids = turns[3]
    assert earlier == 2
    dialog = [{"role": "system", "content": "Tell short stories."},
              {"role": "user", "content": users[0]}, {"role": "assistant", "content": answers[1]},
              {"role": "user", "content": users[1]}, {"role": "assistant", "content": answers[2]},
              {"role": "user", "content": users[2]}]
    assert ids == encode_dialog(stories.tokenizer, dialog)
    first_two = encode_dialog(stories.tokenizer, dialog[:4])[:-1]  # both exchanges, before turn 3
    assert ids[: len(first_two)] == first_two


def test_long_session_trims_oldest_exchanges():
    users = [f"Tell me story number {i} about a dog and a ball" for i in range(8)]
    proc, turns, answers = run_chat(users + ["/exit", "never read"], "--max_seq_len", "96",
                                    "--max_gen_len", "20")
    assert sorted(answers) == list(range(1, 9))  # every turn answered
    assert "dropped the oldest exchange" in proc.stderr
    assert all(len(ids) + 20 <= 96 for _, ids in turns.values())
    assert turns[8][0] < 7  # the oldest exchanges are gone
    assert "never read" not in proc.stdout


def test_session_reset_and_system_prompt_kept(stories):
    session = ChatSession(stories, "Be brief.", max_gen_len=8, temperature=0)
    session.reserve = 400  # room kept for an answer: the dialog must fit 112 tokens
    for i in range(4):
        answer = "".join(session.ask(f"Tell me about the number {i} and a big red ball in the park"))
        assert answer.strip() and session.history[-1] == {"role": "assistant", "content": answer}
        dialog, tokens = session.fit("next")
        assert dialog[0] == {"role": "system", "content": "Be brief."}
        assert len(tokens) + 400 <= 512 or len(dialog) == 2
    assert len(session.history) < 8
    session.reset()
    assert session.fit("hi")[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_ctrl_c_stops_the_answer_not_the_program(stories, monkeypatch, capsys):
    def interrupted(dialog, **kwargs):
        yield "Once upon"
        raise KeyboardInterrupt

    monkeypatch.setattr(stories, "stream_chat_completion", interrupted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n/bogus\nsecond\n"))
    chat_loop(stories, None, 8)
    out = capsys.readouterr().out
    assert out.count("Once upon [stopped]") == 2  # both turns ran; the program went on
    assert "unknown command /bogus" in out
    monkeypatch.undo()


def test_sigint_stops_answer_in_real_process():
    cmd = [sys.executable, "-m", "llama.cli", "chat", "--ckpt_dir", models_path("stories260K-meta"),
           "--tokenizer_path", models_path("stories260K", "tok512.model"), "--device", "cpu",
           "--temperature", "0", "--max_seq_len", "512", "--max_gen_len", "480"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=REPO)
    try:
        proc.stdin.write(b"Tell me a story\n")
        proc.stdin.flush()
        seen = b""
        while b"> Tell me a story\n" not in seen or seen.endswith(b"story\n"):
            byte = proc.stdout.read(1)
            assert byte, proc.stderr.read().decode()[-2000:]
            seen += byte
        proc.send_signal(signal.SIGINT)  # while the answer streams
        out, err = proc.communicate(b"again\n/exit\n", timeout=60)
    finally:
        proc.kill()
    text = (seen + out).decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "[stopped]" in text and "> again" in text


def chat_through_pty(cmd: list[str], lines: list[str]) -> str:
    """Run an interactive chat with its stdin and stdout on a pseudo-terminal (echo off), type the
    lines, and return what it printed."""
    import pty
    import termios

    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO  # only the program's output comes back
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env, cwd=REPO)
    os.close(slave)
    os.write(master, "".join(line + "\n" for line in lines).encode())
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed: every process holding it has ended
                break
            if not chunk:
                break
            out += chunk
        err = proc.communicate(timeout=240)[1]
    finally:
        proc.kill()
        os.close(master)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode().replace("\r\n", "\n")


def test_chat_under_torchrun_follows_rank_0(stories_tokenizer):
    """Two ranks (gloo) chat through rank 0's terminal: two turns, /reset, /exit, the same
    replies as one process."""
    flags = ["example_chat_completion.py", "--ckpt_dir", models_path("stories260K-meta-mp2"),
             "--tokenizer_path", stories_tokenizer, "--interactive", "--device", "cpu", "--dtype", "float32",
             "--temperature", "0", "--max_seq_len", "256", "--max_gen_len", "24"]
    lines = ["Tell me a story", "What happened next?", "/reset", "Tell me a story", "/exit"]
    one = chat_through_pty([sys.executable, *flags], lines)
    two = chat_through_pty([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *flags], lines)
    assert two == one
    # Each answer ends with an empty line; "> " is the prompt (on a terminal, readline writes it to stdout).
    blocks = [b.strip() for b in one.replace("> ", "").split("\n\n") if b.strip()]
    assert "(conversation cleared)" in blocks[2]
    answers = [blocks[0], blocks[1], blocks[2].removeprefix("(conversation cleared)").strip()]
    assert all(answers) and len(blocks) == 3
    assert answers[2] == answers[0] != answers[1]  # after /reset the first question gets the first answer


def test_invalid_utf8_on_stdin_keeps_the_conversation():
    cmd = [sys.executable, "-m", "llama.cli", "chat", "--ckpt_dir", models_path("stories260K-meta"),
           "--tokenizer_path", models_path("stories260K", "tok512.model"), "--device", "cpu",
           "--temperature", "0", "--max_gen_len", "8", "--log_level", "debug"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    lines = b"Hello \xff\xfe there\nWhat next?\n"
    proc = subprocess.run(cmd, input=lines, capture_output=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    err = proc.stderr.decode()
    turns = {int(m[1]): int(m[2]) for m in TURN_RE.finditer(err)}
    assert turns == {1: 0, 2: 1}  # both lines answered; the second turn still holds the first exchange
    assert "Hello \ufffd\ufffd there" in proc.stdout.decode()  # echoed as a terminal would show it
