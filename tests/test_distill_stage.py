"""The distill stage end to end with a scripted teacher: filtering, dedup, provenance, resume."""
import json

import datasets
import pytest

from r1pipe.config import validate
from r1pipe.demo.build import build_demo_files
from r1pipe.demo.task import generate_examples
from r1pipe.rollout import Completion
from r1pipe.rundir import RunDir
from r1pipe.stages.distill import DistillConfig, Distiller, run


class ScriptedTeacher:
    """Answers each demo prompt with: the right solution, the same with extra spaces, a wrong answer,
    a malformed think block, and a truncated one -- as token ids, like a rollout engine."""

    def __init__(self, tokenizer, solutions: dict[str, str], fail_after_calls: int | None = None):
        self.tokenizer, self.solutions, self.calls, self.fail_after = tokenizer, solutions, 0, fail_after_calls
        self.seeds = []

    def generate(self, prompt_ids, sampling, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.seeds.append(seed)
        out = []
        for index, ids in enumerate(prompt_ids):
            problem = self.tokenizer.decode(ids, skip_special_tokens=True)
            good = self.solutions[problem]
            wrong = good[: good.rindex("{") + 1] + "x}"
            variants = [(good, False), (good.replace("\n", " \n"), False), (wrong, False),
                        (good.replace("</think>", ""), False), (good, True)]
            for text, truncated in variants[: sampling.n]:
                token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                out.append(Completion(index, token_ids, [0.0] * len(token_ids), truncated))
        return out

    def close(self):
        pass


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    paths = build_demo_files(root, sizes={"pretrain": 1, "cold_start": 1, "rl": 1, "distill": 10, "test": 1})
    solutions = {row["problem"]: row["solution"] for row in generate_examples(13, 0, "train")}
    return paths, solutions


def _config(tmp_path, paths, **sampling):
    data = {
        "stage": "distill",
        "run": {"name": "distill", "output_dir": str(tmp_path / "runs")},
        "teacher": {"path": str(paths["tokenizer"]), "tokenizer": str(paths["tokenizer"])},
        "data": {"sources": [{"path": str(paths["distill"])}], "reward_columns": ["answer"]},
        "sampling": {"n": 5, "max_tokens": 96, "prompts_per_chunk": 4, **sampling},
        "rollout": {"engine": "native"},
        "rewards": [{"name": "accuracy"}, {"name": "format", "weight": 0.5}],
    }
    return validate(DistillConfig, data, "distill.yaml")


def _run(cfg, monkeypatch, solutions, fail_after=None):
    teachers = []

    def scripted(self):
        teachers.append(ScriptedTeacher(self.tokenizer, solutions, fail_after))
        return teachers[-1]

    monkeypatch.setattr(Distiller, "_build_engine", scripted)
    return run(cfg, RunDir.open(cfg)), teachers


def test_keeps_one_correct_well_formed_sample_per_prompt(tmp_path, monkeypatch, demo_files):
    paths, solutions = demo_files
    cfg = _config(tmp_path, paths)
    outputs, _ = _run(cfg, monkeypatch, solutions)
    rows = [json.loads(line) for line in open(outputs["jsonl"])]
    assert outputs["rows"] == len(rows) == 10
    stats = json.loads((tmp_path / "runs" / "distill" / "stats.json").read_text())
    assert stats["generated"] == 50 and stats["kept"] == 10 and stats["duplicate"] == 10
    assert stats["below_accuracy"] == 10 and stats["malformed_think"] == 10 and stats["overlong"] == 10
    prompts = [json.loads(line) for line in open(paths["distill"])]
    for row, prompt in zip(rows, prompts, strict=True):
        assert row["messages"][0] == {"role": "user", "content": prompt["prompt"]}
        assert row["messages"][1] == {"role": "assistant", "content": solutions[prompt["prompt"]]}
        assert row["rewards"] == {"accuracy": 1.0, "format": 1.0} and row["reward_total"] == 1.5
        assert row["answer"] == prompt["answer"] and row["teacher"] == str(paths["tokenizer"])
        assert row["sampling"]["temperature"] == 0.6 and row["sampling"]["n"] == 5
    on_disk = datasets.load_from_disk(outputs["dataset"])
    assert on_disk["messages"] == [r["messages"] for r in rows]
    assert datasets.load_dataset("json", data_files=outputs["jsonl"], split="train").num_rows == 10


def test_killed_run_resumes_without_duplicates(tmp_path, monkeypatch, demo_files):
    paths, solutions = demo_files
    whole, _ = _run(_config(tmp_path / "a", paths), monkeypatch, solutions)
    cfg = _config(tmp_path / "b", paths)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, monkeypatch, solutions, fail_after=2)  # two of three chunks written, then killed
    assert len(list((tmp_path / "b" / "runs" / "distill" / "shards").glob("chunk_*.jsonl"))) == 2
    resumed, teachers = _run(cfg, monkeypatch, solutions)
    assert teachers[0].calls == 1  # only the missing chunk was generated
    assert open(resumed["jsonl"]).read() == open(whole["jsonl"]).read().replace(str(tmp_path / "a"), str(tmp_path / "b"))


def test_thresholds_must_name_configured_rewards(tmp_path, demo_files):
    from r1pipe.config import RecipeError

    paths, _ = demo_files
    with pytest.raises(RecipeError, match="keep.min_reward: 'correct' is not one of the configured rewards"):
        validate(DistillConfig, {**_config(tmp_path, paths).model_dump(mode="json"), "keep": {"min_reward": {"correct": 1}}},
                 "distill.yaml")
