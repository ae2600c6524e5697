"""Ending what a sandboxed run leaves behind: its processes (by process group, or by uid as found
in /proc, which also reaches processes that left the group with setsid) and the files its uid left
in the world-writable directories, so that nothing carries over from one run to the next."""

from __future__ import annotations

import os
import shutil
import signal
import time

WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def processes_of(uid: int) -> list[int]:
    """Pids whose real uid is `uid` (read from status: /proc/<pid> of a setuid process is root's)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as handle:
                for line in handle:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(name))
                        break
        except (OSError, ValueError):
            pass
    return pids


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`, including ones that left the process group with setsid."""
    for _ in range(100):
        pids = processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def remove_files_of(uid: int, prefix: str) -> None:
    """Delete what `uid` left in the (server's) world-writable directories: no channel between runs."""
    for directory in WORLD_WRITABLE_DIRS:
        try:
            entries = list(os.scandir(prefix + directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def own_process_count() -> int:
    """Processes and threads of this process's uid (what RLIMIT_NPROC counts when uids are not switched)."""
    count = 0
    for pid in processes_of(os.getuid()):
        try:
            count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count
