"""Worker process of `r1pipe.rewards.math`: verifies (gold, prediction, timeout) requests with math-verify.

Runs math-verify in its main thread, so math-verify's SIGALRM timeouts work; the parent kills the
whole process if even that fails to return in time. Protocol on stdin/stdout: 4-byte little-endian
length + marshal payload, one reply per request: True, False or None (cannot decide).
"""

import math
import marshal
import struct
import sys
import warnings

warnings.filterwarnings("ignore")

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify  # noqa: E402

_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _parse(answer: str, seconds: int):
    text = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"
    return parse(text, extraction_config=_CONFIG, parsing_timeout=seconds)


def check(gold, prediction, timeout):
    if gold is None or not gold.strip():
        return None
    seconds = max(1, math.ceil(timeout))
    try:
        gold_parsed = _parse(gold, seconds)
        if not gold_parsed:
            return None  # an unparseable gold answer gives no score, never a free 1.0
        if prediction is None or not prediction.strip():
            return False
        predicted = _parse(prediction, seconds)
        if not predicted:
            return False
        return bool(verify(gold_parsed, predicted, timeout_seconds=seconds))
    except Exception:  # noqa: BLE001  (math-verify raises on timeouts and on exotic input)
        return None


def main():
    read, write = sys.stdin.buffer.read, sys.stdout.buffer
    ready = marshal.dumps("ready")  # math-verify imported: the parent may send requests
    write.write(struct.pack("<I", len(ready)) + ready)
    write.flush()
    while True:
        header = read(4)
        if len(header) < 4:
            return
        gold, prediction, timeout = marshal.loads(read(struct.unpack("<I", header)[0]))
        reply = marshal.dumps(check(gold, prediction, timeout))
        write.write(struct.pack("<I", len(reply)) + reply)
        write.flush()


if __name__ == "__main__":
    main()
