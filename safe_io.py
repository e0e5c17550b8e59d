"""Outputs that survive a kill, and progress a person can read: what every stage shares.

    with atomic_write(path) as tmp: ...     write the file `tmp`; it replaces `path` only
                                            when the block ends without an error
    with output_lock(path): ...             one writer per output, for the whole run
    append_jsonl(path, record)              one record per line, in one write
    read_jsonl(path)                        the records; a line torn by a kill is dropped
    progress(total=..., desc=...)           a tqdm bar on a terminal, plain lines in a log
    with StopSignals() as stop: ...         SIGTERM and Ctrl-C: stop at a safe point, save,
                                            say how to continue (stop.check(), Interrupted)
    raise DataError(...)                    bad input: one line that names the file and
                                            what to do (also data.DataError)

A genuine-oracle label costs CPU-minutes, so no stage may lose or corrupt one: dbs take one
SQLite transaction per result (data.py), and every other output is either appended a
whole line at a time or replaced whole (os.replace of a finished temporary file, atomic on
one file system).
"""
import json
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm


class DataError(ValueError):
    """Bad input data: the message names the file and row, and what to do (one line).
    Here, in a module that imports no other module of this repository, so that data.py can
    import this one (data.DataError is this class) without a cycle."""


LOG_SECONDS = 30.0   # off a terminal, progress() writes a line at most this often


# ---------------------------------------------------------------------------------------
# Whole files: written beside, then renamed
# ---------------------------------------------------------------------------------------

@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path` (path + '.tmp') to write; when the block ends
    normally it replaces `path` at once (os.replace), so a reader or a kill sees the old
    file or the new one, never half of one. On an error the temporary file is removed and
    `path` is left as it was. A temporary file that a killed run left is removed first
    (each output has one writer: output_lock)."""
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------------------

@contextmanager
def output_lock(path):
    """Hold an advisory lock (flock) on an output for the whole run, so that two processes
    never write one output. `path` is a directory (lock file path/.writer.lock) or a file
    (lock file path.writer.lock). A second process gets a DataError naming the process
    that holds it.
    The kernel drops the lock when its holder dies, kill -9 included."""
    import fcntl
    lock_path = os.path.join(path, ".writer.lock") if os.path.isdir(path) \
        else f"{path}.writer.lock"             # not path.lock: ase.db locks that one itself
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataError(f"{path} is being written by another process (PID {holder}); "
                                 "wait for it to end, or write to another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # ase.db's own lock, <db>.lock, is a file created exclusively for each write: a kill
        # -9 in the middle of a write leaves it behind, and the next writer would wait for
        # it forever. Holding this lock, no other writer exists: such a file is stale.
        dbs = [path] if not os.path.isdir(path) else \
            [os.path.join(path, name) for name in os.listdir(path) if name.endswith(".db")]
        for db in dbs:
            if os.path.exists(f"{db}.lock"):
                os.remove(f"{db}.lock")
                print(f"removed {db}.lock, a lock a killed run left behind", file=sys.stderr)
        yield
    finally:
        os.close(fd)          # releases the lock; the file stays (deleting it would race)


# ---------------------------------------------------------------------------------------
# JSON lines: records appended one whole line at a time
# ---------------------------------------------------------------------------------------

def _split_tail(text):
    """(complete lines, partial last line or '') of a JSON-lines text."""
    head, sep, tail = text.rpartition("\n")
    return (head + sep, tail)


def read_jsonl(path):
    """The records of a JSON-lines file. A partial last line (a kill mid-write) is dropped
    with a warning; a bad line anywhere else is a DataError naming it."""
    with open(path, errors="replace") as f:
        complete, tail = _split_tail(f.read())
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}, line {number}: not JSON; fix or remove the "
                                     "line") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))          # complete, only its newline missing
        except json.JSONDecodeError:
            print(f"warning: {path}: dropped a partial last line (a write was "
                  "interrupted)", file=sys.stderr)
    return records


def cut_partial_line(path):
    """Cut a partial last line (a kill mid-write) off a JSON-lines file that this process
    writes (under its output_lock); a whole record that only lacks its newline gets one."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        text = f.read()
        if not text or text.endswith(b"\n"):
            return
        cut = text.rfind(b"\n") + 1                  # end of the last complete line
        try:
            json.loads(text[cut:])
            f.write(b"\n")
        except ValueError:
            f.truncate(cut)


def append_jsonl(path, record):
    """Append one record as one line in one write, after cutting off a partial last line
    that a kill left, so that it never glues onto the new record."""
    cut_partial_line(path)
    with open(path, "ab") as f:
        f.write((json.dumps(record) + "\n").encode())


# ---------------------------------------------------------------------------------------
# Progress: a live bar on a terminal, a line now and then in a log
# ---------------------------------------------------------------------------------------

def progress(iterable=None, **tqdm_kwargs):
    """A tqdm progress bar (same arguments). On a terminal (stderr is a tty) tqdm's live
    bar. In a log or a pipe a live bar would be one endless line of carriage returns, so
    there it writes the bar as a plain line when it starts, at most every LOG_SECONDS, and
    when it closes."""
    if sys.stderr.isatty():
        return tqdm(iterable, **tqdm_kwargs)
    return LogLinesProgress(iterable, **tqdm_kwargs)


class _Lines:
    """The stream a LogLinesProgress draws on: every bar tqdm draws becomes one line (its
    carriage return and padding gone); the empty redraws that clear a bar write nothing."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


class LogLinesProgress(tqdm):
    """tqdm for logs: each refresh is one plain line on stderr (or `file`), at most one
    every LOG_SECONDS (refresh() and set_postfix() included), and the final one on close."""

    def __init__(self, iterable=None, file=None, **tqdm_kwargs):
        self._last_line = -float("inf")      # time.monotonic() of the last line written
        tqdm_kwargs["mininterval"] = max(tqdm_kwargs.get("mininterval", 0.1), LOG_SECONDS)
        super().__init__(iterable, file=_Lines(file or sys.stderr), **tqdm_kwargs)

    def refresh(self, nolock=False, lock_args=None):
        if time.monotonic() - self._last_line < LOG_SECONDS:
            return False
        self._last_line = time.monotonic()
        return super().refresh(nolock=nolock, lock_args=lock_args)


# ---------------------------------------------------------------------------------------
# SIGTERM (a cluster scheduler's) and SIGINT (Ctrl-C): stop at a safe point, say how to go on
# ---------------------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """A stop signal reached the stage. A KeyboardInterrupt, so that no `except Exception`
    swallows it; exit_code is the shell's 128 + signal number (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.name = signum, signal.Signals(signum).name
        self.exit_code = 128 + signum


class StopSignals:
    """SIGTERM and SIGINT as a request to stop, for the `with` block.

    deferred=False: the signal raises Interrupted where the program is (for stages whose
    outputs are written whole, one result at a time). deferred=True: the signal is only
    noted, and the stage calls check() at its safe points (between updates, between
    optimization steps, while it waits for the oracle), which raises Interrupted there, so
    that the state it saves is whole; a second signal raises at once. A SIGINT that the
    process inherited as ignored (a background job of a script) stays ignored, as the shell
    meant. The previous handlers come back when the block ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, deferred=False):
        self.deferred, self.received, self._previous = deferred, None, {}

    def __enter__(self):
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if signum == signal.SIGINT and previous == signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        if not self.deferred or self.received is not None:
            raise Interrupted(signum)
        self.received = signum

    def check(self):
        """Raise Interrupted if a stop signal came (deferred mode's safe point)."""
        if self.received is not None:
            raise Interrupted(self.received)


def continue_command(add_flag=None, argv=None):
    """The command that continues this run, for the line printed at a stop: this process'
    own command line, plus `add_flag` (e.g. --resume) when it is not there yet."""
    argv = list(sys.argv if argv is None else argv)
    if add_flag and add_flag not in argv:
        argv.append(add_flag)
    return "python " + shlex.join(argv)


def stopped_line(stop, saved, command):
    """The one line a stage prints when a signal stopped it: which signal, what is saved,
    the command to continue."""
    return f"stopped by {stop.name}: {saved}; continue with: {command}"
