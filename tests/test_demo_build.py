"""The committed demo files are exactly what r1pipe.demo.build generates."""
import json
from pathlib import Path

from r1pipe.demo.build import SIZES, build_demo_files

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo"


def test_committed_demo_files_match_the_generator(tmp_path):
    paths = build_demo_files(tmp_path)
    for path in paths.values():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            committed = DEMO / file.relative_to(tmp_path)
            assert committed.read_bytes() == file.read_bytes(), f"{committed} is stale: run python -m r1pipe.demo.build"


def test_held_out_prompts_never_appear_in_training_files():
    def prompts(name):
        return {json.loads(line)["prompt"] for line in (DEMO / "data" / f"{name}.jsonl").open()}

    test = prompts("test")
    for name in ("cold_start", "rl", "distill"):
        assert not test & prompts(name)
    pretrain = {json.loads(line)["text"].split("<|assistant|>")[0].removeprefix("<|user|>")
                for line in (DEMO / "data" / "pretrain.jsonl").open()}
    assert not test & pretrain and len(pretrain) == SIZES["pretrain"]
