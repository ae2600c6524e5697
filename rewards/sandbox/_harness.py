"""The program that runs inside the sandbox: it executes one untrusted Python program and its tests.

Started once per `Sandbox` as a fork server (`python -I -S -c <this file's source> <socket fd>`, see
`forkserver.py`; as root, in the sandbox's namespaces, with an empty environment); per job it forks
a monitor, which forks the runner and reports its pid and exit status. The runner

1. reads the job (marshal; a random nonce, the program, the tests, limits) and deletes the file,
2. sets the resource limits and drops to the job's unprivileged uid (so RLIMIT_NPROC binds and
   nothing outside the work directory is writable; the kernel then also forbids other processes
   of that uid to read this one's memory),
3. moves every function it runs after the untrusted code into a private globals dict with a private
   copy of `builtins`, so rebinding module attributes, `builtins` or `__main__` changes nothing it uses;
   test code likewise runs on that copy of `builtins` and imports copies of the modules it needs,
   taken before the program ran,
4. installs an audit hook that refuses frame, gc and ctypes introspection, tracing, /proc access and
   sockets (frames and gc are how a program could reach the nonce or the result list), and disables
   `signal.signal` (a signal handler receives the interrupted frame),
5. runs the tests, then writes `R1PASS <nonce> <one bit per test>` to the report pipe and exits 0.

The parent accepts the bits only from that exact line with its nonce plus exit status 0, so an early
`exit(0)`/`os._exit(0)`, a crash, a kill or printed fake markers yield no pass. Values returned by the
program's functions must be plain builtin data (exact int/str/list/... types, checked recursively),
so an object whose `__eq__` always returns True fails the test instead of passing it.

stdlib only. A runner is a fork of the warm server, so interpreter start-up and the imports of
commonly used modules are paid once per `Sandbox`, not per program.
"""

import builtins
import marshal
import os
import sys
from os import _exit, close, dup2, fork, kill, open as os_open, setpgid, waitpid, write
from resource import RLIMIT_AS, RLIMIT_CORE, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC, setrlimit
from time import monotonic, sleep

import operator
import signal
from collections import Counter, OrderedDict, defaultdict, deque

_FunctionType = type(lambda: None)
_ModuleType = type(sys)
_PLAIN_SCALARS = (int, float, complex, str, bytes, bool, type(None), range, type)
_PLAIN_CONTAINERS = (list, tuple, set, frozenset, dict, deque)
_DICT_SUBCLASSES = (Counter, OrderedDict, defaultdict)
_COMPARISONS = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "is": operator.is_, "is not": operator.is_not, "in": lambda a, b: b.__contains__(a),
    "not in": lambda a, b: not b.__contains__(a),
}
_BLOCKED_EVENTS = frozenset({
    "sys._getframe", "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "object.__getattr__",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "_thread.start_new_thread", "os.symlink", "os.link",
    "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn",
})
_BLOCKED_IMPORTS = frozenset({
    "ctypes", "_ctypes", "_signal", "signal", "gc", "_posixsubprocess", "_testcapi", "_xxsubinterpreters",
})

_WNOHANG = os.WNOHANG
_O_RDONLY, _O_WRONLY_CREAT = os.O_RDONLY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
_SIGKILL = signal.SIGKILL
_stat = os.stat
_PROC_DEVICE = os.stat("/proc").st_dev
_sys_modules = sys.modules
_sys_stdout = sys.stdout


class SandboxViolation(ValueError):
    """Raised into the program when it uses something the sandbox forbids.

    A ValueError so that stdlib helpers that probe `sys._getframe` for a module name (namedtuple,
    TypeVar, Enum) fall back gracefully instead of failing the program.
    """


def _audit(event, args):
    if event in _BLOCKED_EVENTS or event.startswith("ctypes."):
        raise SandboxViolation(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in _BLOCKED_IMPORTS:
        raise SandboxViolation(f"sandbox: importing {args[0]} is not allowed")
    if event == "open" and type(args[0]) in (str, bytes):
        try:
            device = _stat(args[0]).st_dev  # follows /dev/fd/.. style links to their real target
        except OSError:
            return
        if device == _PROC_DEVICE:
            raise SandboxViolation("sandbox: /proc is not accessible")


def _refuse_signal(*args, **kwargs):
    raise SandboxViolation("sandbox: installing signal handlers is not allowed")


def _is_plain(value):
    """True when `value` is built only from exact builtin data types (their __eq__ can't be forged)."""
    stack, seen, count = [value], set(), 0
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _PLAIN_SCALARS:
            continue
        if kind not in _PLAIN_CONTAINERS:
            return False
        if id(item) in seen:
            continue
        seen.add(id(item))
        count += len(item)
        if count > 10_000_000:
            return False
        if kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            stack.extend(item)
    return True


def _guard(fn, violations):
    """Wrap a program function so that a non-plain result (or argument mutated into one) fails the test.

    A Counter/OrderedDict/defaultdict result becomes a plain dict: those classes are Python-level
    (patchable) or compare through helpers the program could rebind, and against the dicts that
    tests expect a plain dict compares the same way (C-level dict equality).
    """

    def guarded(*args, **kwargs):
        plain_arguments = _is_plain(args) and _is_plain(kwargs)
        result = fn(*args, **kwargs)
        if type(result) in _DICT_SUBCLASSES:
            result = dict(result)
        if not _is_plain(result) or (plain_arguments and not (_is_plain(args) and _is_plain(kwargs))):
            violations.append(1)
            raise AssertionError("sandbox: the program returned a non-plain object")
        return result

    return guarded


def _trusted_checks(violations):
    """`__r1_compare__`, `__r1_truth__`, `__r1_not__`: what hardened test code calls (see hardening.harden_test)."""

    def compare(ops, *operands):
        for i in range(len(ops)):
            left, right = operands[i], operands[i + 1]
            if ops[i] not in ("is", "is not") and not (_is_plain(left) and _is_plain(right)):
                violations.append(1)
                return False
            if not _COMPARISONS[ops[i]](left, right):
                return False
        return True

    def truth(value):
        if not _is_plain(value):
            violations.append(1)
            return False
        return value

    def negate(value):
        return not truth(value) if _is_plain(value) else truth(value)

    return {"__r1_compare__": compare, "__r1_truth__": truth, "__r1_not__": negate}


def _module_copies(names):
    """Module objects with a copy of each module's namespace as it is before the program runs.

    Test code imports these copies, so a program that rebinds `math.isclose` (and restores it before
    anyone looks) cannot change what the tests call.
    """
    copies = {}
    for name in names:
        try:
            __import__(name)
        except BaseException:  # noqa: BLE001  (a test importing a missing module fails by itself)
            continue
        module = _sys_modules[name]
        copy = _ModuleType(name)
        copy.__dict__.update(module.__dict__)
        copies[name] = copy
    for copy in copies.values():
        for key, value in list(copy.__dict__.items()):
            if type(value) is _ModuleType and value.__name__ in copies:
                copy.__dict__[key] = copies[value.__name__]
    return copies


def _test_importer(copies, original_import):
    def test_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in copies:
            return copies[name] if fromlist else copies[name.partition(".")[0]]
        return original_import(name, globals, locals, fromlist, level)

    return test_import


def _run_functions(job, clean_builtins, copies):
    """Exec the program once, then each test in a namespace where the program's functions are guarded."""
    n_tests = len(job["tests"])
    program_ns = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(compile(job["program"], "<solution>", "exec"), program_ns)
    except BaseException:  # noqa: BLE001  (any failure of the program fails every test)
        return [False] * n_tests
    violations = []
    test_ns = {"__name__": "__test__", "__builtins__": clean_builtins}
    exposed = job["expose"] if job["expose"] is not None else list(program_ns)
    names = {}
    for name in exposed:
        if name not in program_ns or name.startswith("__"):
            continue
        value = program_ns[name]
        if type(value) is _FunctionType and value.__globals__ is program_ns:
            value = _guard(value, violations)
        elif type(value) is _ModuleType and value.__name__ in copies:
            value = copies[value.__name__]
        names[name] = value
    test_ns.update(names)  # setup code may use the program's names (MBPP builds trees of its Node)
    try:
        exec(compile(job["setup"], "<test_setup>", "exec"), test_ns)
    except BaseException:  # noqa: BLE001
        return [False] * n_tests
    if job["expose"] is not None:
        test_ns.update(names)  # explicitly exposed names win over same-named setup definitions
    test_ns.update(_trusted_checks(violations))
    results = []
    for test in job["tests"]:
        seen = len(violations)
        try:
            exec(compile(test, "<test>", "exec"), dict(test_ns))
            ok = True
        except BaseException:  # noqa: BLE001
            ok = False
        results.append(ok and len(violations) == seen)
    return results


def _same_output(actual, expected):
    """Line-wise comparison that ignores trailing whitespace and trailing blank lines."""
    def lines(text):
        return [line.rstrip() for line in text.rstrip().split("\n")]

    return lines(actual) == lines(expected)


def _run_case(job, index, stdin_text, report_fd):
    """Fork, run the program on one stdin in the child, return its stdout (None on failure)."""
    in_path, out_path = f"case{index}.in", f"case{index}.out"
    with builtins.open(in_path, "w") as handle:
        handle.write(stdin_text)
    pid = fork()
    if pid == 0:
        try:
            close(report_fd)
            setpgid(0, 0)
            setrlimit(RLIMIT_FSIZE, (job["output_bytes"], job["output_bytes"]))
            dup2(os_open(in_path, _O_RDONLY), 0)
            dup2(os_open(out_path, _O_WRONLY_CREAT, 0o600), 1)
            code = 0
            try:
                exec(compile(job["program"], "<solution>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
            except SystemExit as stop:
                code = 0 if stop.code in (None, 0) else 1
            except BaseException:  # noqa: BLE001
                code = 1
            _sys_stdout.flush()
        except BaseException:  # noqa: BLE001
            code = 1
        _exit(code)
    deadline = monotonic() + job["case_timeout"]
    status, pause = None, 0.0005
    while True:
        done, status = waitpid(pid, _WNOHANG)
        if done:
            break
        if monotonic() > deadline:
            try:
                kill(-pid, _SIGKILL)
            except OSError:
                pass
            kill(pid, _SIGKILL)
            waitpid(pid, 0)
            write(2, f"case {index}: timed out\n".encode())
            return None
        sleep(pause)
        pause = min(pause * 2, 0.01)
    if status != 0:
        write(2, f"case {index}: exit status {status}\n".encode())
        return None
    with builtins.open(out_path, "rb") as handle:
        return handle.read().decode("utf-8", "replace")


def _run_stdio(job, report_fd):
    results = []
    for stdin_text, expected in job["cases"]:
        output = _run_case(job, len(results), stdin_text, report_fd)
        results.append(output is not None and _same_output(output, expected))
    return results


def _main(job, report_fd, clean_builtins, copies):
    if job["mode"] == "function":
        results = _run_functions(job, clean_builtins, copies)
    else:
        results = _run_stdio(job, report_fd)
    bits = "".join("1" if ok is True else "0" for ok in results)
    write(report_fd, f"R1PASS {job['nonce']} {bits}\n".encode())
    if job["uid"] is not None:
        kill(-1, _SIGKILL)  # as the job's own uid: ends whatever the program left running, not us
    _exit(0)


def _private(function_names, clean_builtins):
    """Copies of this module's functions bound to a private globals dict (not reachable from the program)."""
    private = dict(globals())
    private["__builtins__"] = clean_builtins
    for name in function_names:
        original = private[name]
        private[name] = _FunctionType(original.__code__, private, name, original.__defaults__, original.__closure__)
    return private


def _enter(job_path, report_fd):
    """In the forked runner: read the job, limit, drop privileges, lock down, run."""
    with builtins.open(job_path, "rb") as handle:
        job = marshal.loads(handle.read())
    os.unlink(job_path)
    limits = job["limits"]
    setrlimit(RLIMIT_CORE, (0, 0))
    setrlimit(RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    setrlimit(RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    setrlimit(RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    setrlimit(RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    setrlimit(RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    if job["uid"] is not None:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
        if os.getuid() != job["uid"] or os.geteuid() != job["uid"]:
            _exit(3)
    os.set_inheritable(report_fd, False)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write then fails with EFBIG
    copies = _module_copies(job["preload"])
    clean_builtins = dict(builtins.__dict__)
    private = _private(
        ["_audit", "_refuse_signal", "_is_plain", "_guard", "_trusted_checks", "_test_importer", "_run_functions",
         "_same_output", "_run_case", "_run_stdio", "_main"],
        clean_builtins,
    )
    clean_builtins["__import__"] = private["_test_importer"](copies, builtins.__import__)
    sys.addaudithook(private["_audit"])
    signal.signal = private["_refuse_signal"]
    sys.modules["_signal"].signal = private["_refuse_signal"]
    private["_main"](job, report_fd, clean_builtins, copies)


def _monitor(job_path, stdout_fd, stderr_fd, report_fd, status_fd):
    """Fork the runner, tell the parent its pid, wait for it, tell the parent its wait status.

    Runs as root and never touches the job, so the runner's exit status reaches the parent
    unforged; the parent kills the runner's process group by that pid on a timeout.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = fork()
    if pid == 0:
        try:
            close(status_fd)
            null = os_open("/dev/null", _O_RDONLY)
            dup2(null, 0)
            dup2(stdout_fd, 1)
            dup2(stderr_fd, 2)
            for fd in (null, stdout_fd, stderr_fd):
                close(fd)
            os.setsid()
            os.chdir(os.path.dirname(job_path))
            _enter(job_path, report_fd)
        finally:
            _exit(4)
    for fd in (stdout_fd, stderr_fd, report_fd):
        close(fd)
    write(status_fd, f"{pid}\n".encode())
    _, status = waitpid(pid, 0)
    write(status_fd, f"{status}\n".encode())
    _exit(0)


_ZYGOTE_PRELOAD = ("math", "random", "copy", "re", "string", "itertools", "functools", "heapq", "bisect",
                   "operator", "typing", "fractions", "decimal", "statistics", "json")


def _zygote(control_fd):
    """Fork server: one warm interpreter forks a monitor (and that a runner) per job.

    A fork of this small, already-initialised process costs ~1 ms where a fresh interpreter costs
    ~20 ms; modules that tests and programs commonly import are loaded once here. Requests are
    SEQPACKET messages `<job path>` carrying the runner's stdout, stderr, report and status pipes.
    """
    import socket

    os.environ.clear()  # whatever the launcher (sh, unshare) added: programs get no environment
    for name in _ZYGOTE_PRELOAD:
        __import__(name)
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 4096, 4)
        except OSError:
            return
        if not message:
            return
        if len(fds) != 4:
            for fd in fds:
                close(fd)
            continue
        if fork() == 0:
            control.close()  # the program must never reach the fork server
            _monitor(message.decode(), *fds)
        for fd in fds:
            close(fd)


if __name__ == "__main__":
    _zygote(int(sys.argv[1]))
