"""The whole demo pipeline, shrunk to minutes: every stage runs and the report is written (slow)."""
import json
import subprocess
import sys

import pytest

SMALL = [
    "base.train.max_steps=30", "base.train.warmup_steps=5", "base.train.save_every=0",
    "cold_start.train.max_steps=4", "rl.train.max_steps=2", "rl.train.warmup_steps=0", "rl.train.save_every=0",
    "distill.data.sources.0.max_rows=40", "distill.sampling.prompts_per_chunk=20",
    # an undertrained teacher is rarely right: keep everything so the student step has data
    "distill.keep.min_reward={accuracy: 0.0}", "distill.filters.require_think=false",
    "distill.filters.reject_truncated=false", "distill.filters.max_foreign_word_share=1.0",
    "distill.filters.reject_code_blocks=false",
    "student.train.max_steps=10", "student.train.warmup_steps=2",
    *[f"eval_{m}.eval.benchmarks.0.limit=20" for m in ("base", "cold_start", "rl", "student")],
]


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end(tmp_path):
    command = [sys.executable, "-m", "r1pipe", "run", "recipes/demo/pipeline.yaml", f"output_dir={tmp_path}", *SMALL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = tmp_path / "demo" / "report"
    numbers = json.loads((report / "report.json").read_text())
    assert set(numbers["accuracy"]) == {"base", "cold-start", "rl", "student"}
    assert (report / "plots" / "accuracy.png").is_file() and (report / "plots" / "training.png").is_file()
    assert "| rl | demo-test |" in (report / "report.md").read_text()
