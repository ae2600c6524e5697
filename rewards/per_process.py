"""One lazily built instance per process, for the process-wide sandbox and math-verify worker pool.

A forked child (e.g. a data-loader worker) builds its own: what those instances hold (worker pipes,
sandbox uid slots, a fork server) belongs to the process that built them.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def per_process(build: Callable[[], T]) -> Callable[[], T]:
    """Decorate a builder: the first call in each process builds, later calls return that instance."""
    lock = threading.Lock()
    instance: T | None = None
    owner_pid: int | None = None

    @functools.wraps(build)
    def get() -> T:
        nonlocal instance, owner_pid
        with lock:
            if instance is None or owner_pid != os.getpid():
                instance, owner_pid = build(), os.getpid()
            return instance

    return get
