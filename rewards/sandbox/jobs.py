"""What the sandbox runs and what it returns: a program with its tests (`Job`), its resource limits
(`Limits`) and the outcome (`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed program."""

    timeout_s: float = 10.0  # wall clock for the whole program (all tests)
    case_timeout_s: float = 4.0  # wall clock per stdin/stdout case
    memory_mb: int = 1024  # RLIMIT_AS: address space, so it must cover the interpreter (~30 MB)
    file_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    processes: int = 8  # RLIMIT_NPROC: processes and threads of the program's uid
    open_files: int = 64  # RLIMIT_NOFILE
    output_kb: int = 1024  # captured stdout/stderr each, and each stdin/stdout case's output

    def __post_init__(self):
        for name in ("timeout_s", "case_timeout_s", "memory_mb", "file_mb", "processes", "open_files", "output_kb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Job:
    """One program and its tests.

    mode "function": exec `program`, exec `setup` in the test namespace, expose the program's names
    (all, or only `expose`), then run each snippet of `tests`; a test passes when it raises nothing.
    mode "stdio": run `program` once per case with `stdin`, compare stdout line by line with `expected`.
    """

    program: str
    mode: str = "function"
    tests: tuple[str, ...] = ()
    setup: str = ""
    expose: tuple[str, ...] | None = None
    cases: tuple[tuple[str, str], ...] = ()

    @property
    def n_tests(self) -> int:
        return len(self.tests) if self.mode == "function" else len(self.cases)


@dataclass
class RunResult:
    """Outcome of one job: `passed` has one entry per test; `status` says how the program ended."""

    passed: list[bool]
    status: str  # ok | timeout | output_limit | crashed | no_report
    returncode: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    wall_s: float = 0.0

    @property
    def pass_fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def function_job(program: str, tests, setup: str = "", expose=None) -> Job:
    return Job(program=program, mode="function", tests=tuple(tests), setup=setup,
               expose=None if expose is None else tuple(expose))


def stdio_job(program: str, cases) -> Job:
    """`cases`: pairs (stdin, expected stdout)."""
    return Job(program=program, mode="stdio", cases=tuple((str(i), str(o)) for i, o in cases))
