"""The sandbox's pool: `Sandbox` runs jobs `max_workers` at a time, one unprivileged uid per slot,
through its fork server, and returns each job's verdict; `default_sandbox()` is the process-wide one.

A run: write the job (with a fresh nonce) into a throwaway work directory owned by the slot's uid,
hand the fork server the job and four pipes, read the pipes under caps and the deadline
(`verdict.collect`), decide the verdict (`verdict.read_report`), then end whatever the run left
behind (`cleanup`).
"""

from __future__ import annotations

import atexit
import marshal
import math
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from r1pipe.rewards.per_process import per_process
from r1pipe.rewards.sandbox.cleanup import kill_group, kill_uid, own_process_count, remove_files_of
from r1pipe.rewards.sandbox.forkserver import ForkServer
from r1pipe.rewards.sandbox.hardening import harden_test, imported_modules
from r1pipe.rewards.sandbox.jobs import Job, Limits, RunResult, function_job, stdio_job
from r1pipe.rewards.sandbox.verdict import collect, read_report

_REPORT_LIMIT = 1 << 16


@dataclass
class Sandbox:
    """Runs jobs in parallel, `max_workers` at a time, each under `limits`."""

    max_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if self.max_workers < 1:
            raise ValueError(f"sandbox max_workers must be >= 1, got {self.max_workers}")
        self._owner_pid = os.getpid()
        self._root = tempfile.mkdtemp(prefix="r1pipe-sandbox-")
        os.chmod(self._root, 0o711)
        self._isolate_users = os.geteuid() == 0
        # uids unique to this process: slots of two r1pipe processes never share a uid
        self._base_uid = base = 1_000_000 + (os.getpid() % 1_000_000) * 256
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(min(self.max_workers, 256)):
            self._slots.put(base + slot)
        self._server = ForkServer(os.path.join(self._root, "python"), self._root)
        self._server_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="sandbox")
        atexit.register(self.close)

    @property
    def network_isolation(self) -> str:
        """"namespace" (no network device at all) or "audit-hook" (sockets refused in Python)."""
        with self._server_lock:
            if self._server.proc is None:
                self._server.start()
            return "namespace" if self._server.isolated else "audit-hook"

    def run(self, job: Job, limits: Limits | None = None) -> RunResult:
        """Run one job (blocking)."""
        if os.getpid() != self._owner_pid:
            raise RuntimeError("a Sandbox cannot be used in a forked child; create one per process")
        uid = self._slots.get()
        try:
            return self._run(job, limits or self.limits, uid)
        finally:
            self._slots.put(uid)

    def map(self, jobs, limits: Limits | None = None) -> list[RunResult]:
        """Run many jobs through the bounded pool; results in input order."""
        return list(self._executor.map(lambda job: self.run(job, limits), jobs))

    def close(self):
        if os.getpid() != self._owner_pid:
            return  # a forked child's copy: the server and directories belong to the parent
        self._executor.shutdown(wait=True)
        with self._server_lock:
            self._server.close()
        shutil.rmtree(self._root, ignore_errors=True)

    # ------------------------------------------------------------------------------------------

    def _run(self, job: Job, limits: Limits, uid: int) -> RunResult:
        with self._server_lock:
            prefix, work_root = self._server.locate()
        workdir = tempfile.mkdtemp(dir=prefix + work_root)  # as seen from here
        inside = os.path.join(work_root, os.path.basename(workdir))  # as the program sees it
        run_as = uid if self._isolate_users else None
        if run_as is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        nonce = secrets.token_hex(16)
        _write_job(os.path.join(workdir, ".job"), _job_spec(job, limits, nonce, run_as))
        pipes = {name: os.pipe() for name in ("stdout", "stderr", "report", "status")}
        start = time.monotonic()
        try:
            with self._server_lock:
                self._server.send(os.path.join(inside, ".job"), [w for _, w in pipes.values()])
        finally:
            for _, write_end in pipes.values():
                os.close(write_end)
        caps = {"stdout": limits.output_kb * 1024, "stderr": limits.output_kb * 1024, "report": _REPORT_LIMIT,
                "status": 64}
        outputs = {name: b"" for name in pipes}
        status = "crashed"
        try:
            status, outputs = collect({name: r for name, (r, _) in pipes.items()}, caps, start + limits.timeout_s)
        finally:
            for read_end, _ in pipes.values():
                os.close(read_end)
            lines = outputs["status"].split()
            runner = int(lines[0]) if lines else None
            returncode = os.waitstatus_to_exitcode(int(lines[1])) if len(lines) > 1 else None
            passed, status = read_report(outputs["report"], nonce, job.n_tests, status, returncode)
            _clean_up(status, run_as, runner, prefix, workdir)
        wall = time.monotonic() - start
        return RunResult(passed, status, returncode, outputs["stdout"], outputs["stderr"], wall)


def _job_spec(job: Job, limits: Limits, nonce: str, run_as: int | None) -> dict:
    """What the harness reads: the program, the hardened tests, the modules to preload, the limits."""
    return {
        "nonce": nonce, "mode": job.mode, "program": job.program, "setup": job.setup,
        "tests": [harden_test(test) for test in job.tests], "expose": None if job.expose is None else list(job.expose),
        "cases": [list(case) for case in job.cases], "uid": run_as,
        "preload": list(imported_modules(job.setup, *job.tests)), "case_timeout": limits.case_timeout_s,
        "output_bytes": limits.output_kb * 1024,
        "limits": {
            "cpu_s": math.ceil(limits.timeout_s) + 1, "memory_bytes": limits.memory_mb << 20,
            "file_bytes": limits.file_mb << 20, "open_files": limits.open_files,
            "processes": limits.processes if run_as is not None else own_process_count() + limits.processes,
        },
    }


def _write_job(path: str, spec: dict) -> None:
    """The job file, created fresh (never through an existing file) and readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(marshal.dumps(spec))


def _clean_up(status: str, run_as: int | None, runner: int | None, prefix: str, workdir: str) -> None:
    """End what a run left: its processes (unless it ended cleanly), its uid's files, its work directory."""
    if status != "ok":  # after a clean run the harness has killed the uid's leftovers itself
        if run_as is not None:
            kill_uid(run_as)  # by uid: also reaches processes that left the group with setsid
        elif runner is not None:
            kill_group(runner)
    if run_as is not None:
        remove_files_of(run_as, prefix)
    shutil.rmtree(workdir, ignore_errors=True)


@per_process
def default_sandbox() -> Sandbox:
    """The process-wide sandbox used by the code rewards and helpers unless one is passed
    (a forked child, e.g. a data-loader worker, gets its own: uid slots must not be shared)."""
    return Sandbox()


def run_python(program: str, tests=(), *, setup: str = "", cases=None, limits: Limits | None = None,
               sandbox: Sandbox | None = None) -> RunResult:
    """Run one program: against function tests (`tests`, `setup`), or stdin/stdout `cases` if given."""
    job = stdio_job(program, cases) if cases is not None else function_job(program, tests, setup)
    return (sandbox or default_sandbox()).run(job, limits)
