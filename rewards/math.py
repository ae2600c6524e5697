"""Math answers: extraction (`\\boxed{}`), gold answers of GSM8K/MATH/AIME rows, and verification.

`verify` uses math-verify (sympy-based equivalence: fractions vs decimals, `\\dfrac`, `x = 3` vs `3`,
thousands separators, percent, `\\text{}` wrappers, sets, intervals). It runs in worker processes
(`_verify_worker.py`): math-verify's own timeout uses SIGALRM, which only works in the main thread
and cannot interrupt a C-level regex or sympy loop, so a worker that overruns the time limit is
killed and replaced. A verification therefore never crashes and never hangs; it returns None when it
cannot decide (unparseable gold, timeout, error). A worker that cannot start at all (math-verify
not importable) is a setup error: RewardError, which stops the stage with one line, instead of
every answer silently scoring as undecided.
"""

from __future__ import annotations

import atexit
import json
import marshal
import os
import queue
import re
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from r1pipe.rewards.registry import RewardError

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The content of the last `\\boxed{...}` (balanced braces; `\\boxed 5` too), or of the last match
    of `pattern`'s first group when a pattern is given. None when there is no answer."""
    if not isinstance(text, str):
        return None
    if pattern is not None:
        matches = list(re.finditer(pattern, text, re.DOTALL))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if last.groups() else last.group(0)).strip()
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : i].strip()
            continue  # unbalanced: try an earlier box
        token = re.match(r"([^\s$]+)", text[start:])
        if token:
            return token.group(1)
    return None


GOLD_SOURCES = ("auto", "gsm8k", "math", "aime", "text")


def gold_answer(row_or_text, source: str = "auto") -> str | None:
    """The gold answer of a dataset row (or of a raw answer/solution text).

    gsm8k: text after the last `####` of `answer`; math: `answer`, else the last box of `solution`;
    aime: the integer `answer`; text: the string itself (its last box if it has one). `auto` picks
    from the fields present. None when no answer can be found (never an empty string).
    """
    if source not in GOLD_SOURCES:
        raise ValueError(f"gold_answer: unknown source {source!r}; expected one of {', '.join(GOLD_SOURCES)}")
    if isinstance(row_or_text, dict):
        row = row_or_text
        answer, solution = row.get("answer"), row.get("solution")
        if source == "aime" or (source == "auto" and isinstance(answer, int) and not isinstance(answer, bool)):
            try:
                return str(int(str(answer).strip()))  # AIME answers are integers 0-999 ("033" is 33)
            except ValueError:
                return None
        if source == "gsm8k" or (source == "auto" and isinstance(answer, str) and "####" in answer):
            match = _GSM8K_FINAL.search(answer or "")
            return _clean(match.group(1)) if match else None
        if answer is not None and str(answer).strip():
            return _text_answer(str(answer))
        if solution:
            return extract_answer(str(solution))
        return None
    if row_or_text is None:
        return None
    text = str(row_or_text)
    if source == "gsm8k" or (source == "auto" and "####" in text):
        match = _GSM8K_FINAL.search(text)
        return _clean(match.group(1)) if match else None
    return _text_answer(text)


def _text_answer(text: str) -> str | None:
    boxed = extract_answer(text) if _BOXED.search(text) else None
    return _clean(boxed if boxed is not None else text)


def _clean(answer: str | None) -> str | None:
    answer = (answer or "").strip().strip("$").strip()
    return answer or None


# ----------------------------------------------------------------------------------------------
# Verification in worker processes

_WORKER = Path(__file__).with_name("_verify_worker.py")
WORKER_START_S = 120.0  # importing math-verify (sympy) takes seconds on a loaded machine
# The worker runs isolated (-I: with this folder on sys.path, this module would shadow stdlib `math`)
# and is handed this process's import path instead, so it finds math-verify wherever we do
# (site-packages, PYTHONPATH, a --target directory).
_BOOT = ("import json, runpy, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "runpy.run_path(sys.argv[2], run_name='__main__')")


class _Worker:
    """One verification process; requests and replies are length-prefixed marshal messages. It
    answers a ready message once math-verify is imported; if it dies first, verification cannot run
    at all, and that is a setup error (RewardError) rather than a stream of undecided samples."""

    def __init__(self):
        path = json.dumps([p for p in sys.path if p and Path(p).resolve() != _WORKER.parent])
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, path, str(_WORKER)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True, close_fds=True)
        try:
            self._read_reply(time.monotonic() + WORKER_START_S)
        except (TimeoutError, EOFError, OSError, ValueError) as err:
            self.proc.kill()
            self.proc.wait()
            self.stderr.seek(0)
            lines = self.stderr.read().decode(errors="replace").strip().splitlines()
            self.stderr.close()
            why = lines[-1] if lines else f"{type(err).__name__}, no error output"
            raise RewardError(
                f"math verification: the math-verify worker ({sys.executable}) did not start: {why}") from None

    def ask(self, request, deadline: float):
        data = marshal.dumps(request)
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        return self._read_reply(deadline)

    def _read_reply(self, deadline: float):
        return marshal.loads(self._read_exact(struct.unpack("<I", self._read_exact(4, deadline))[0], deadline))

    def _read_exact(self, size: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        chunks, have = [], 0
        while have < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _readable(fd, remaining):
                raise TimeoutError
            chunk = os.read(fd, size - have)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks)

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


class Verifier:
    """A pool of `workers` verification processes (started lazily, replaced when killed)."""

    def __init__(self, workers: int | None = None):
        self.size = workers or max(1, min(4, os.cpu_count() or 1))
        self.owner_pid = os.getpid()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _take(self) -> _Worker:
        with self._lock:
            start = self._started < self.size
            self._started += start
        if not start:
            return self._idle.get()
        try:
            return _Worker()
        except RewardError:
            with self._lock:
                self._started -= 1
            raise

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._started -= 1

    def verify_many(self, pairs, timeout: float = 5.0) -> list[bool | None]:
        """Verify (gold, prediction) pairs on up to `size` workers; each pair gets `timeout` seconds."""
        pairs = list(pairs)
        results: list[bool | None] = [None] * len(pairs)
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(pairs)):
            todo.put(i)

        failures: list[RewardError] = []

        def drain():
            try:
                work()
            except RewardError as err:  # a worker could not start: raised in the caller's thread below
                failures.append(err)

        def work():
            worker = None
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    break
                worker = worker or self._take()
                try:
                    results[i] = worker.ask((*pairs[i], float(timeout)), time.monotonic() + timeout + 1.0)
                except (TimeoutError, EOFError, OSError, ValueError):
                    self._discard(worker)  # hung or died: the pair stays None, a fresh worker follows
                    worker = None
            if worker is not None:
                self._idle.put(worker)

        threads = [threading.Thread(target=drain) for _ in range(min(self.size, len(pairs)) - 1)]
        for thread in threads:
            thread.start()
        drain()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return results

    def close(self):
        if os.getpid() != self.owner_pid:
            return  # a forked child's copy: the workers belong to the parent
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break


_verifier: Verifier | None = None
_verifier_lock = threading.Lock()


def default_verifier() -> Verifier:
    """The process-wide verifier pool; a forked child gets its own (worker pipes can't be shared)."""
    global _verifier
    with _verifier_lock:
        if _verifier is None or _verifier.owner_pid != os.getpid():
            _verifier = Verifier()
        return _verifier


def verify(gold: str | None, prediction: str | None, timeout: float = 5.0) -> bool | None:
    """Is `prediction` mathematically equal to `gold`? None if gold is missing/unparseable or the
    check timed out; False for a missing prediction."""
    return verify_many([(gold, prediction)], timeout)[0]


def verify_many(pairs, timeout: float = 5.0) -> list[bool | None]:
    """Batched `verify` over the worker pool."""
    clean = []
    for gold, prediction in pairs:
        clean.append((None if gold is None else str(gold), None if prediction is None else str(prediction)))
    return default_verifier().verify_many(clean, timeout)
