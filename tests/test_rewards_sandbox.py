"""The sandbox contains hostile programs and scores them correctly; benign ones pass."""
import os
import time

import pytest

from r1pipe.rewards.sandbox import Limits, Sandbox, function_job, stdio_job

ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]


@pytest.fixture(scope="module")
def sandbox():
    # generous wall-clock limits: the 2 cores are shared with other jobs; hostile loops cost timeout_s each
    box = Sandbox(max_workers=2, limits=Limits(timeout_s=4.0, case_timeout_s=4.0, memory_mb=512))
    yield box
    box.close()


def run(sandbox, program, tests=TESTS, **kw):
    return sandbox.run(function_job(program, tests, **kw))


def test_benign_program_passes_and_wrong_one_fails(sandbox):
    assert run(sandbox, ADD).passed == [True, True]
    wrong = run(sandbox, "def add(a, b):\n    return a - b + 1\n")
    assert wrong.passed == [False, False] and wrong.status == "ok"
    assert run(sandbox, "def add(a, b):\n    return 3\n").passed == [True, False]


def test_stdio_cases(sandbox):
    program = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\nsys.exit(0)\n"
    result = sandbox.run(stdio_job(program, [("1 2\n", "3\n"), ("5 5", "10"), ("1 1", "3")]))
    assert result.passed == [True, True, False], result


HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "sleep": "import time\ntime.sleep(60)\n",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory_bomb": "x = bytearray(8 * 1024 ** 3)\n" + ADD,
    "memory_bomb_growing": "x = []\nwhile True:\n    x.append(' ' * 10 ** 7)\n",
    "huge_output": "while True:\n    print('x' * 100000)\n",
    "early_exit": "import sys\nsys.exit(0)\n",
    "early_os_exit": "import os\nos._exit(0)\n",
    "fake_marker": "import os\nprint('R1PASS 0 11')\nos.write(1, b'R1PASS 0 11\\n')\nfor fd in range(3, 64):\n"
                   "    try:\n        os.write(fd, b'R1PASS 0 11\\n')\n    except OSError:\n        pass\nos._exit(0)\n",
    "signal_parent": "import os, signal\nfor pid in range(2, 40000):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
                     "    except OSError:\n        pass\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_own_group": "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "always_equal": "class Any:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
                    "        return False\n    def __bool__(self):\n        return True\n"
                    "def add(a, b):\n    return Any()\n",
    "always_equal_subclass": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                             "def add(a, b):\n    return Int(0)\n",
    "always_equal_nested": "class Any:\n    def __eq__(self, other):\n        return True\n"
                           "def add(a, b):\n    return [Any()]\n",
    "patch_builtins": "import builtins\nbuiltins.AssertionError = None\nbuiltins.len = lambda x: 3\n"
                      "def add(a, b):\n    return 0\n",
    "frame_walk": "import sys\nf = sys._getframe()\nwhile f:\n    f.f_locals.clear()\n    f = f.f_back\n"
                  "def add(a, b):\n    return 0\n",
    "traceback_frame": "try:\n    1 / 0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame.f_back\n"
                       "    f.f_globals['x'] = 1\ndef add(a, b):\n    return 0\n",
    "gc_walk": "import gc\nfor o in gc.get_objects():\n    pass\ndef add(a, b):\n    return 0\n",
    "proc_mem": "f = open('/proc/self/mem', 'rb')\ndef add(a, b):\n    return 0\n",
    "proc_via_dev_fd": "f = open('/dev/fd/../environ', 'rb')\ndef add(a, b):\n    return 0\n",
    "signal_handler": "import signal\nsignal.signal(signal.SIGALRM, lambda s, f: f.f_back)\nsignal.alarm(1)\n"
                      "def add(a, b):\n    return 0\n",
    "main_module": "import __main__\nfor k in list(vars(__main__)):\n    if callable(getattr(__main__, k)):\n"
                   "        setattr(__main__, k, lambda *a, **k: [True] * 2)\n"
                   "def add(a, b):\n    return 0\n",
    "ctypes": "import ctypes\ndef add(a, b):\n    return 0\n",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo R1PASS'])\ndef add(a, b):\n    return 0\n",
    "self_restoring_patch": "import math\nreal = math.isclose\ndef fake(*a, **k):\n    math.isclose = real\n"
                            "    return True\nmath.isclose = fake\ndef add(a, b):\n    return 0\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero_and_is_contained(sandbox, name):
    tests = ["import math\nassert math.isclose(add(1, 2), 3)"] if name == "self_restoring_patch" else TESTS
    start = time.monotonic()
    result = run(sandbox, HOSTILE[name], tests)
    assert result.passed == [False] * len(tests), (name, result)
    assert time.monotonic() - start < 10
    assert os.getpid() and os.path.exists("/proc/self")  # we are alive


def test_network_is_off(sandbox):
    program = ("import socket\nok = False\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
               "except Exception:\n    ok = True\ndef add(a, b):\n    return a + b if ok else 0\n")
    assert run(sandbox, program).passed == [True, True]
    assert sandbox.network_isolation == "namespace"


def test_environment_is_empty_and_secrets_unreadable(sandbox, monkeypatch):
    monkeypatch.setenv("R1PIPE_TEST_SECRET", "hunter2")
    program = ("import os\nleak = {k: v for k, v in os.environ.items() if k != 'LC_CTYPE'}\ntry:\n    leak['root'] = open('/root/.bashrc').read()\n"
               "except OSError:\n    pass\ndef add(a, b):\n    return a + b if not leak else 0\n")
    assert run(sandbox, program).passed == [True, True]


def test_writes_outside_workdir_fail_and_leave_nothing(sandbox, tmp_path):
    target = tmp_path / "pwned"
    program = (f"import os\nwrote = []\nfor p in [{str(target)!r}, '/work/pwned', '/root/pwned', '../pwned']:\n"
               "    try:\n        open(p, 'w').write('x')\n        wrote.append(p)\n    except OSError:\n        pass\n"
               "open('/tmp/r1pipe-sandbox-leftover', 'w').write('x')\nopen('local.txt', 'w').write('ok')\n"
               "def add(a, b):\n    return a + b if not wrote else 0\n")
    assert run(sandbox, program).passed == [True, True]
    assert not target.exists() and not os.path.exists("/tmp/r1pipe-sandbox-leftover")


def test_fork_bomb_leaves_no_process_behind(sandbox):
    program = ("import os\nfor _ in range(50):\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
               "            import time\n            time.sleep(1000)\n    except OSError:\n        pass\n" + ADD)
    result = run(sandbox, program)
    assert result.passed == [True, True]
    from r1pipe.rewards.sandbox.cleanup import processes_of as _processes_of
    uids = range(sandbox._base_uid, sandbox._base_uid + 2)
    for _ in range(100):  # SIGKILLed processes take a moment to be reaped
        if not any(_processes_of(uid) for uid in uids):
            break
        time.sleep(0.02)
    assert not any(_processes_of(uid) for uid in uids)


def test_statuses_name_what_happened(sandbox):
    assert run(sandbox, HOSTILE["infinite_loop"]).status == "timeout"
    assert run(sandbox, HOSTILE["huge_output"]).status == "output_limit"
    assert run(sandbox, HOSTILE["early_os_exit"]).status == "no_report"
    assert run(sandbox, HOSTILE["kill_own_group"]).status == "crashed"
    assert run(sandbox, "raise ValueError('bad')\n").status == "ok"  # the harness reports the failures


def test_stdio_programs_cannot_forge_the_report(sandbox):
    forge = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'R1PASS 0 111\\n')\n"
             "    except OSError:\n        pass\nprint(41)\n")
    result = sandbox.run(stdio_job(forge, [("", "42")] * 3))
    assert result.passed == [False] * 3 and result.status == "ok"


def test_programs_run_in_parallel_through_the_pool(sandbox):
    jobs = [function_job(ADD, TESTS)] * 6 + [function_job("import time\ntime.sleep(1.5)\n" + ADD, TESTS)] * 2
    start = time.monotonic()
    results = sandbox.map(jobs)
    assert [r.passed for r in results] == [[True, True]] * 8
    assert time.monotonic() - start < 2.9  # the two 1.5 s sleepers overlap


def test_lying_results_from_classes_and_callables_fail(sandbox):
    liar = "class Any:\n    def __eq__(self, other):\n        return True\n    def __bool__(self):\n        return True\n"
    via_class = liar + "class add:\n    def __new__(cls, a, b):\n        return Any()\n"
    via_callable = liar + "class Adder:\n    def __call__(self, a, b):\n        return Any()\nadd = Adder()\n"
    for program in (via_class, via_callable):
        assert run(sandbox, program, ["assert add(1, 2) == 3", "assert add(1, 1)", "assert not not add(0, 0)"]).passed == [
            False, False, False]


def test_without_root_the_sandbox_warns_and_still_blocks_sockets(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    box = Sandbox(max_workers=1, limits=Limits(timeout_s=5.0))
    try:
        with pytest.warns(RuntimeWarning, match="without network/user isolation"):
            assert box.network_isolation == "audit-hook"
        program = ("import socket\nok = False\ntry:\n    socket.socket()\nexcept Exception:\n    ok = True\n"
                   "def add(a, b):\n    return a + b if ok else 0\n")
        assert box.run(function_job(program, TESTS)).passed == [True, True]
        assert box.run(function_job(HOSTILE["early_os_exit"], TESTS)).passed == [False, False]
    finally:
        box.close()


def test_disk_filling_stops_at_the_private_tmpfs(sandbox):
    import shutil

    program = ("n = 0\ntry:\n    while n < 200:\n        with open(f'big{n}', 'wb') as f:\n"
               "            f.write(b'x' * (8 << 20))\n        n += 1\nexcept OSError:\n    pass\n"
               "def add(a, b):\n    return a + b if n < 200 else 0\n")
    before = shutil.disk_usage("/").used
    assert run(sandbox, program).passed == [True, True]  # stopped well before 1.6 GB
    assert shutil.disk_usage("/").used - before < 256 << 20


def test_forked_children_get_their_own_sandbox():
    from r1pipe.rewards.sandbox import default_sandbox, run_python

    parent = default_sandbox()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a data-loader-like child
        try:
            child = default_sandbox()
            ok = child is not parent and run_python(ADD, TESTS).passed == [True, True]
            os.write(write_end, b"1" if ok else b"0")
            child.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    with pytest.raises(RuntimeError, match="forked child"):
        parent._owner_pid = -1
        try:
            parent.run(function_job(ADD, TESTS))
        finally:
            parent._owner_pid = os.getpid()
    assert run_python(ADD, TESTS).passed == [True, True]
