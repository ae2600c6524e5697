"""The sandbox's fork server: `_harness.py` started once per `Sandbox`, inside fresh namespaces.

Everything that isolates a program from the host is set up here, before any program runs: the
network, mount and pid namespaces (`unshare`), the size-capped private tmpfs mounts and the hiding
of a Python installation under a directory the programs' uids cannot traverse.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

HARNESS = Path(__file__).with_name("_harness.py")
ISOLATED_WORK_ROOT = "/tmp/r1pipe-work"  # inside the fork server's mount namespace (a tmpfs)
_TMPFS_MB = {"/tmp": 512, "/var/tmp": 64, "/dev/shm": 64}


def _python() -> tuple[str, str]:
    """(interpreter path, installation prefix) of the base interpreter (-S needs no venv)."""
    prefix = os.path.realpath(sys.base_prefix)
    candidate = os.path.join(prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return (candidate if os.access(candidate, os.X_OK) else os.path.realpath(sys.executable)), prefix


def _first_closed_ancestor(path: str) -> str | None:
    """The outermost directory above `path` that other users cannot traverse (e.g. /root)."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        ancestor = os.path.join(*parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


class ForkServer:
    """The sandbox's fork server (`_harness.py`), started inside fresh network, mount and pid namespaces.

    Pid: the server is the namespace's init, so orphans of programs are reaped at once (its SIGCHLD
    is ignored) instead of lingering as zombies that count against the next run's RLIMIT_NPROC,
    and killing the server ends every process inside.
    Network: only a downed loopback. Mount: if the Python installation sits below a directory the
    program's uid cannot traverse (pyenv under /root), that directory is covered with an empty tmpfs
    and the installation alone is bind-mounted back, which also hides the rest of it. Without the
    privilege for namespaces (not root) the server runs unisolated and the harness's audit hook that
    refuses sockets is the only network barrier.
    """

    def __init__(self, stage_dir: str, fallback_work_root: str):
        self.stage_dir = stage_dir
        self.fallback_work_root = fallback_work_root
        self.proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.isolated = False

    def locate(self) -> tuple[str, str]:
        """(prefix that reaches the server's filesystem from here, work root as the server sees it).

        Isolated, the server's /tmp, /var/tmp and /dev/shm are size-capped tmpfs mounts of its own,
        so programs can neither fill the disk nor leave files in the host's temp directories; the
        parent reaches them through /proc/<server>/root.
        """
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return (f"/proc/{self.proc.pid}/root", ISOLATED_WORK_ROOT) if self.isolated else ("", self.fallback_work_root)

    def send(self, job_path: str, fds: list[int]) -> None:
        """Ask for one job; restarts a dead server once."""
        for attempt in range(2):
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            try:
                socket.send_fds(self.control, [job_path.encode()], fds)
                return
            except OSError:
                if attempt:
                    raise
                self.close()

    def start(self) -> None:
        python, prefix = _python()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # EOF when we go away
        # the source goes on the command line: a checkout under /tmp is hidden by the tmpfs below
        server = [python, "-I", "-S", "-c", HARNESS.read_text(), str(theirs.fileno())]
        proc = self._start_isolated(server, prefix, theirs) if os.geteuid() == 0 and shutil.which("unshare") else None
        self.isolated = proc is not None
        if proc is None:
            warnings.warn("r1pipe sandbox: not root or no `unshare`: programs run without network/user "
                          "isolation (sockets are still refused in Python); run as root for full isolation",
                          RuntimeWarning, stacklevel=3)
            proc = subprocess.Popen(server, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                    start_new_session=True, env={})
        theirs.close()
        self.proc, self.control = proc, ours

    def _start_isolated(self, server: list[str], prefix: str, theirs: socket.socket) -> subprocess.Popen | None:
        """The server under `unshare` with its mounts in place; None when the namespaces could not be made."""
        closed = _first_closed_ancestor(prefix)
        mounts = ""
        if closed:
            os.makedirs(self.stage_dir, exist_ok=True)
            mounts = ('mount --bind "$1" "$2"; mount -t tmpfs -o mode=755,size=1m tmpfs "$3"; '
                      'mkdir -p "$1"; mount --bind "$2" "$1"; umount "$2"; ')
        for directory, size in _TMPFS_MB.items():
            if (prefix + "/").startswith(directory + "/"):
                continue  # never hide the interpreter itself
            mounts += (f'if [ -d {directory} ]; then mount -t tmpfs -o mode=1777,size={size}m tmpfs {directory}; fi; ')
        mounts += f"mkdir -m 711 {ISOLATED_WORK_ROOT}; "
        script = f'set -e; {mounts}echo ready; shift 3; exec "$@"'
        proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
             "sh", "-c", script, "sh", prefix, self.stage_dir,
             closed or "/nonexistent", *server],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),), start_new_session=True, env={})
        if proc.stdout.readline() != b"ready\n":
            proc.kill()
            proc.wait()
            return None
        return proc

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
