"""safe_io: whole-or-nothing files, JSON lines with a torn tail, progress lines in a log."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

import data
import safe_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# atomic_write
# ---------------------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_only_when_the_block_succeeds(tmp_path):
    path = str(tmp_path / "summary.json")
    with open(f"{path}.tmp", "w") as f:
        f.write("left by a killed run")
    with safe_io.atomic_write(path) as tmp:
        assert tmp == f"{path}.tmp" and not os.path.exists(tmp)   # the stale one removed
        with open(tmp, "w") as f:
            f.write("first")
        assert not os.path.exists(path)                            # not before the end
    assert open(path).read() == "first" and os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(KeyboardInterrupt):
        with safe_io.atomic_write(path) as tmp, open(tmp, "w") as f:
            f.write("half of the sec")
            raise KeyboardInterrupt                 # a kill in the middle of the write
    assert open(path).read() == "first" and os.listdir(tmp_path) == ["summary.json"]


# ---------------------------------------------------------------------------------------
# Append-only JSON lines with a torn tail
# ---------------------------------------------------------------------------------------

def test_a_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path, capsys):
    path = str(tmp_path / "log.jsonl")
    safe_io.append_jsonl(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2, "b')                       # a kill in the middle of a write
    assert safe_io.read_jsonl(path) == [{"a": 1}]
    assert "dropped a partial last line" in capsys.readouterr().err
    safe_io.append_jsonl(path, {"a": 3})
    assert open(path).read() == '{"a": 1}\n{"a": 3}\n'
    with open(path, "a") as f:
        f.write('{"a": 4}')                          # whole, only the newline missing
    safe_io.append_jsonl(path, {"a": 5})
    assert safe_io.read_jsonl(path) == [{"a": 1}, {"a": 3}, {"a": 4}, {"a": 5}]
    with open(path, "w") as f:
        f.write('{"a": 1}\nnot json\n{"a": 2}\n')   # damage inside: named, not skipped
    with pytest.raises(data.DataError, match="line 2: not JSON"):
        safe_io.read_jsonl(path)


# ---------------------------------------------------------------------------------------
# progress: tqdm's bar on a terminal, plain lines in a log
# ---------------------------------------------------------------------------------------

LOOP = """
import sys, time
sys.path.insert(0, {root!r})
import safe_io
safe_io.LOG_SECONDS = {seconds}
bar = safe_io.progress(total=40, desc="label", unit="conf", dynamic_ncols=True)
for i in range(40):
    time.sleep(0.005)
    bar.update(1)
    bar.set_postfix(failed=i)          # refreshes the bar: throttled in a log too
    if i == 20:
        bar.write("a warning beside the bar", file=sys.stderr)
bar.close()
for _ in safe_io.progress(range(3), desc="second"):
    pass
"""


def progress_stderr(seconds):
    return subprocess.run([sys.executable, "-c", LOOP.format(root=ROOT, seconds=seconds)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=60).stderr.decode()


def test_progress_off_a_terminal_writes_whole_lines_now_and_then():
    lines = progress_stderr(30.0).split("\n")
    # quicker than LOG_SECONDS: the start and the end of each bar, and the message
    assert lines == ["label:   0%|          | 0/40 [00:00<?, ?conf/s]",
                     "a warning beside the bar", lines[2], lines[3], lines[4], ""]
    assert lines[2].startswith("label: 100%|##########| 40/40 [") and "failed=39]" in lines[2]
    assert lines[3] == "second:   0%|          | 0/3 [00:00<?, ?it/s]"
    assert lines[4].startswith("second: 100%|##########| 3/3 [")
    frequent = progress_stderr(0.02)
    assert "\r" not in frequent and frequent.endswith("\n")
    label = [line for line in frequent.splitlines() if line.startswith("label:")]
    assert len(label) >= 4                  # lines in between (the throttle: the 30 s run)
    assert label[-1].startswith("label: 100%") and "a warning beside the bar" in frequent


def test_progress_on_a_terminal_is_tqdms_live_bar():
    terminal, child_side = pty.openpty()
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 cols
    process = subprocess.Popen([sys.executable, "-c", LOOP.format(root=ROOT, seconds=30.0)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=child_side)
    os.close(child_side)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:                          # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(terminal)
        assert process.wait(timeout=60) == 0
    redraws = re.findall(r"\r(?!\n)", out.decode())   # the terminal turns \n into \r\n
    assert len(redraws) > 10 and "40/40" in out.decode()              # redrawn in place
