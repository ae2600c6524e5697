"""Recipe validation, overrides, run directories, pipelines and the CLI machinery.

A toy stage ("sft" slot, swapped in through the registry) keeps these tests independent of the
real stages; tests/test_cli_recipes.py checks the shipped recipes against the real ones.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, model_validator

from r1pipe import cli, config
from r1pipe.config import ExistingPath, RecipeError, Section, StageConfig
from r1pipe.model.atomic import atomic_write_dir
from r1pipe.rundir import RunDir
from r1pipe.runner import load_recipe


class ToyModel(Section):
    path: str = Field(description="model path")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype")


class ToyTrain(Section):
    lr: float = Field(1e-4, gt=0, description="learning rate")
    max_steps: int = Field(10, ge=1, description="steps")
    batch_size: int = Field(2, ge=1, description="batch")
    warmup_steps: int = Field(0, ge=0, description="warmup")

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self


class ToyData(Section):
    path: ExistingPath = Field(description="data file")
    columns: dict[str, str] = Field(default_factory=dict, description="column mapping")


class ToyReward(Section):
    name: str = Field(description="reward")
    weight: float = Field(1.0, description="weight")


class ToyConfig(StageConfig):
    model: ToyModel = Field(description="model")
    train: ToyTrain = Field(default_factory=ToyTrain, description="training")
    data: ToyData = Field(description="data")
    rewards: list[ToyReward] = Field(default_factory=list, description="rewards")


CALLS = []


def toy_run(cfg, run_dir):
    """A stage that 'trains' by writing checkpoints, so resume can be observed."""
    CALLS.append(cfg)
    latest = run_dir.latest_checkpoint()
    start = int(latest.name.split("_")[1]) if latest else 0
    for step in range(start + 1, cfg.train.max_steps + 1):
        run_dir.log_metrics(step, {"loss": 1.0 / step})
        run_dir.save_checkpoint(step, lambda d, s=step: (d / "state.json").write_text(json.dumps({"step": s})))
    run_dir.plot(["loss"])
    return {"checkpoint": run_dir.latest_checkpoint(), "steps": cfg.train.max_steps}  # a Path, as real stages return


@pytest.fixture
def toy_stage(monkeypatch):
    monkeypatch.setitem(config._STAGES, "sft", (ToyConfig, toy_run))
    CALLS.clear()
    yield


@pytest.fixture
def recipe(tmp_path, toy_stage):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "completion": "2"}\n')
    text = textwrap.dedent(f"""\
        stage: sft
        run:
          name: toy
          output_dir: {tmp_path / 'runs'}
          seed: 3
        model:
          path: tiny
        train:
          lr: 0.001
          max_steps: 4
        data:
          path: {data}
        rewards:
          - name: accuracy
            weight: 1.0
        """)
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    return path


def error_of(path, *overrides) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def edit(path: Path, old: str, new: str) -> Path:
    path.write_text(path.read_text().replace(old, new))
    return path


def test_valid_recipe_and_overrides(recipe):
    cfg = load_recipe(recipe, ["train.lr=3e-4", "model.dtype=bfloat16", "rewards.0.weight=2", "data.columns.q=question"])
    assert cfg.train.lr == 3e-4 and cfg.model.dtype == "bfloat16"
    assert cfg.rewards[0].weight == 2.0 and cfg.data.columns == {"q": "question"}
    assert cfg.run.seed == 3 and cfg.train.max_steps == 4


# Realistic mistakes, each with the message a user should see.
@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("  lr: 0.001", "  learning_rate: 0.001", r"sft.yaml:9: train.learning_rate: unknown key"),
        ("  max_steps: 4", "  max_step: 4", "train.max_step: unknown key (did you mean 'max_steps'?)"),
        ("  lr: 0.001", "  lr: fast", "sft.yaml:9: train.lr: Input should be a valid number"),
        ("  lr: 0.001", "  lr: -0.1", "train.lr: Input should be greater than 0"),
        ("  max_steps: 4", "  max_steps: 2.5", "train.max_steps: Input should be a valid integer"),
        ("model:\n  path: tiny", "model:\n  dtype: float32", "sft.yaml:6: model.path: required key is missing"),
        ("  path: tiny", "  path: tiny\n  dtype: fp17", "model.dtype: Input should be 'float32' or 'bfloat16' (got 'fp17')"),
        ("stage: sft", "stage: sfft", "sft.yaml:1: stage: unknown stage 'sfft' (did you mean 'sft'?)"),
        ("rewards:", "reward:", "sft.yaml:13: reward: unknown key (did you mean 'rewards'?)"),
        ("    weight: 1.0", "    weight: heavy", "sft.yaml:15: rewards.0.weight: Input should be a valid number"),
        ("  seed: 3", "  seed: -1", "run.seed: Input should be greater than or equal to 0"),
        ("  max_steps: 4", "  max_steps: 4\n  warmup_steps: 9", "train: warmup_steps (9) exceeds max_steps (4)"),
        ("  - name: accuracy", "  - nme: accuracy", "rewards.0.nme: unknown key (did you mean 'name'?)"),
        ("train:\n  lr: 0.001\n  max_steps: 4\n", "train: 5\n", "sft.yaml:8: train: Input should be a valid dictionary"),
    ],
)
def test_recipe_mistakes(recipe, old, new, expected):
    assert old in recipe.read_text()
    message = error_of(edit(recipe, old, new))
    assert expected in message, message
    assert str(recipe) in message


def test_missing_data_file_is_named(recipe, tmp_path):
    message = error_of(recipe, f"data.path={tmp_path / 'nope.jsonl'}")
    assert "data.path: no such file or directory" in message and "nope.jsonl" in message


def test_yaml_syntax_error_names_line(recipe):
    edit(recipe, "  lr: 0.001", "  lr: [0.001")
    assert "invalid YAML" in error_of(recipe) and "sft.yaml:" in error_of(recipe)


def test_bad_overrides(recipe):
    assert "expected key=value" in error_of(recipe, "train.lr")
    assert "train.lrr: unknown key (did you mean 'lr'?)" in error_of(recipe, "train.lrr=1")
    assert "is not an index" in error_of(recipe, "rewards.3.weight=1")
    assert "is a value, not a section" in error_of(recipe, "train.lr.x=1")


def test_missing_recipe_and_unknown_stage(tmp_path, toy_stage):
    assert "recipe file not found" in error_of(tmp_path / "absent.yaml")
    path = tmp_path / "r.yaml"
    path.write_text("stage: grpoo\nrun: {name: x}\n")
    with pytest.raises(RecipeError, match=r"unknown stage 'grpoo' \(did you mean 'grpo'\?\)"):
        load_recipe(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(path)


def test_cli_runs_stage_resumes_and_refuses_overwrite(recipe, tmp_path, capsys):
    assert cli.main(["sft", str(recipe)]) == 0
    run = tmp_path / "runs" / "toy"
    assert (run / "config.yaml").is_file() and (run / "plots" / "curves.png").is_file()
    assert [r["step"] for r in RunDir(run).read_metrics()] == [1, 2, 3, 4]
    assert json.loads((run / "outputs.json").read_text())["steps"] == 4
    assert [s for s, _ in RunDir(run).checkpoints()] == [3, 4]  # keep_last=2
    assert (run / "tb").is_dir()

    # The same recipe again: already complete, nothing redone.
    assert cli.main(["sft", str(recipe)]) == 0 and len(CALLS) == 1

    # A different config into the same run directory is refused, and nothing is lost.
    assert cli.main(["sft", str(recipe), "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (changed: train.lr)" in err and "--overwrite" in err
    assert (run / "checkpoints" / "step_4" / "state.json").is_file()

    # --overwrite replaces it.
    assert cli.main(["sft", str(recipe), "train.lr=0.5", "--overwrite"]) == 0
    assert "lr: 0.5" in (run / "config.yaml").read_text()


def test_cli_user_error_is_one_line(recipe, capsys):
    edit(recipe, "  max_steps: 4", "  max_step: 4")
    assert cli.main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("r1pipe: error:") and "did you mean 'max_steps'" in err


def test_cli_closes_the_process_group_it_ran_under(recipe, tmp_path):
    """A stage under torchrun leaves DeepSpeed's process group open; the command closes it on the way out,
    also when the recipe was wrong."""
    import torch.distributed as dist

    for argv, code in ((["sft", str(recipe)], 0), (["sft", str(recipe), "train.max_step=4"], 2)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{code}'}", rank=0, world_size=1)
        assert cli.main(argv) == code
        assert not dist.is_initialized()


def test_resume_continues_from_last_checkpoint(recipe, tmp_path):
    cfg = load_recipe(recipe)
    run_dir = RunDir.open(cfg)
    run_dir.log_metrics(1, {"loss": 1.0})
    run_dir.save_checkpoint(1, lambda d: (d / "state.json").write_text("{}"))
    run_dir.log_metrics(2, {"loss": 0.5})  # logged, then the run died before its checkpoint
    run_dir.truncate_metrics_after(1)
    assert cli.main(["sft", str(recipe)]) == 0
    assert [r["step"] for r in RunDir(run_dir.path).read_metrics()] == [1, 2, 3, 4]
    assert CALLS[-1].train.max_steps == 4


def test_kill_while_writing_checkpoint_is_never_picked_up(tmp_path):
    """A process killed in the middle of writing a checkpoint leaves only a temporary directory."""
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(1, lambda d: (d / "weights.bin").write_bytes(b"ok"))
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from r1pipe.rundir import RunDir
        def slow(d):
            (d / "weights.bin").write_bytes(b"partial")
            Path({str(tmp_path / 'started')!r}).write_text("1")
            time.sleep(60)
        RunDir(Path({str(tmp_path / 'run')!r})).save_checkpoint(2, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run.path / "checkpoints" / ".tmp-step_2").is_dir()
    assert run.latest_checkpoint().name == "step_1"
    assert (run.latest_checkpoint() / "weights.bin").read_bytes() == b"ok"
    # The next save of the same step replaces the leftover.
    run.save_checkpoint(2, lambda d: (d / "weights.bin").write_bytes(b"new"))
    assert run.latest_checkpoint().name == "step_2" and not (run.path / "checkpoints" / ".tmp-step_2").exists()


def test_atomic_write_dir_replaces_whole(tmp_path):
    target = tmp_path / "export"
    atomic_write_dir(target, lambda d: (d / "a").write_text("1"))
    atomic_write_dir(target, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_non_run_directory_is_never_overwritten(recipe, tmp_path):
    victim = tmp_path / "runs" / "toy"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("user data")
    with pytest.raises(RecipeError, match="is not an r1pipe run"):
        RunDir.open(load_recipe(recipe))
    assert (victim / "precious.txt").read_text() == "user data"


def test_pipeline_wires_outputs_and_validates_up_front(recipe, tmp_path):
    from r1pipe.pipeline import load_pipeline, run_pipeline

    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(textwrap.dedent(f"""\
        name: mini
        output_dir: {tmp_path / 'pruns'}
        stages:
          - name: first
            recipe: {recipe.name}
          - name: second
            recipe: {recipe.name}
            overrides:
              model.path: "${{first.checkpoint}}"
              train.max_steps: 2
        """))
    outputs = run_pipeline(pipe)
    assert outputs["first"]["steps"] == 4 and outputs["second"]["steps"] == 2
    assert CALLS[-1].model.path == outputs["first"]["checkpoint"]
    assert (tmp_path / "pruns" / "mini" / "second" / "outputs.json").is_file()
    # Rerun: both complete, nothing redone.
    calls = len(CALLS)
    run_pipeline(pipe)
    assert len(CALLS) == calls

    # A mistake in the second step's recipe is reported before the first step runs.
    edit(pipe, "train.max_steps: 2", "train.max_stepz: 2")
    with pytest.raises(RecipeError, match=r"pipeline step 'second'.*train.max_stepz: unknown key"):
        load_pipeline(pipe)
    edit(pipe, "${first.checkpoint}", "${third.checkpoint}")
    with pytest.raises(RecipeError, match="does not name an earlier step"):
        load_pipeline(pipe)


def test_cli_help_documents_every_option(toy_stage):
    text = cli.describe_schema(ToyConfig)
    for key in ("stage", "run:", "name", "output_dir", "seed", "model:", "dtype", "train:", "lr", "warmup_steps",
                "data:", "columns", "rewards:", "weight"):
        assert key in text
    assert "'float32'|'bfloat16'" in text and "default 0.0001" in text


def test_import_names_do_not_squat_generic_packages():
    """With r1pipe installed, transformers' probe for the PyPI `kernels` package is unaffected."""
    code = (
        "import importlib.util, transformers, transformers.utils as u;"
        "import r1pipe.kernels, r1pipe.model, r1pipe.rewards;"
        "print(u.is_kernels_available(), importlib.util.find_spec('kernels') is None,"
        " importlib.util.find_spec('model') is None, importlib.util.find_spec('rewards') is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    assert out.split() == ["False", "True", "True", "True"]


def test_noisy_metrics_are_smoothed_in_plots(tmp_path):
    """Rewards and accuracies get a debiased EMA line in their panel; the first value is kept as is."""
    from r1pipe.rundir import RunDir, ema, is_noisy

    assert ema([1.0, 0.0, 1.0], span=3) == pytest.approx([1.0, 1 / 3, 5 / 7])
    assert is_noisy("reward/mean") and is_noisy("reward/accuracy/mean") and is_noisy("accuracy")
    assert not is_noisy("reward/std") and not is_noisy("loss")
    run_dir = RunDir(tmp_path)
    for step in range(1, 21):
        run_dir.log_metrics(step, {"reward/mean": (step % 3) / 2 + step / 40, "loss": 1.0 / step})
    path = run_dir.plot(["reward/mean", "loss"], "grpo.png")
    assert path is not None and path.stat().st_size > 0
    run_dir.close()
