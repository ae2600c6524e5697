"""How the parent decides a run's outcome: it reads the runner's pipes under output caps and a deadline,
and accepts test results only from the harness's report line carrying this run's nonce, with exit status 0.
"""

from __future__ import annotations

import os
import selectors
import time


def read_report(report: bytes, nonce: str, n_tests: int, status: str, returncode: int | None):
    """The verdict: the harness's exact report line with this run's nonce, and exit status 0."""
    if status == "ok" and returncode != 0:
        status = "crashed"  # includes a runner whose exit status never arrived
    if status != "ok":
        return [False] * n_tests, status
    head = f"R1PASS {nonce} ".encode()
    bits = report[len(head):-1] if report.startswith(head) and report.endswith(b"\n") else b"?"
    if len(bits) != n_tests or not set(bits) <= {ord("0"), ord("1")}:
        return [False] * n_tests, "no_report"
    return [bit == ord("1") for bit in bits], "ok"


def collect(fds: dict[str, int], caps: dict[str, int], deadline: float) -> tuple[str, dict[str, bytes]]:
    """Read the runner's pipes until its status pipe closes (the monitor saw it exit) or the deadline.

    Output beyond a cap ends the run ("output_limit"). Leftover descendants holding stdout open do
    not delay the verdict: once the status pipe closes, the other pipes are only drained.
    """
    outputs = {name: b"" for name in fds}
    selector = selectors.DefaultSelector()
    for name, fd in fds.items():
        selector.register(fd, selectors.EVENT_READ, name)
    status = "ok"
    finished = False
    try:
        while selector.get_map():
            remaining = 0.0 if finished else deadline - time.monotonic()
            if remaining <= 0 and not finished:
                status = "timeout"
                break
            events = selector.select(remaining)
            if finished and not events:
                break
            for key, _ in events:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    finished = finished or key.data == "status"
                    continue
                outputs[key.data] += chunk
                if len(outputs[key.data]) > caps[key.data]:
                    outputs[key.data] = outputs[key.data][: caps[key.data]]
                    status = "output_limit"
            if status != "ok":
                break
    finally:
        selector.close()
    return status, outputs
