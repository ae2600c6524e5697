"""Every shipped recipe parses and passes `r1pipe plan`; every command documents its options."""

import subprocess
import sys
from pathlib import Path

import pytest

from r1pipe import cli
from r1pipe.config import _section_class, get_stage
from r1pipe.runner import load_recipe, stage_names
from r1pipe.pipeline import is_pipeline, load_pipeline
from r1pipe.plan import print_plan

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.rglob("*.yaml"))


def test_recipes_are_shipped():
    names = {str(p.relative_to(RECIPES_DIR)) for p in RECIPES}
    for needed in ("demo/pipeline.yaml", "qwen2.5-math-1.5b/grpo.yaml", "deepseek-v2-lite/sft.yaml",
                   "deepseek-v2-lite/grpo.yaml", "deepseek-v3/grpo.yaml", "distill-qwen2.5-1.5b/sft.yaml",
                   "distill-llama-3.1-8b/sft.yaml"):
        assert needed in names, sorted(names)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_and_plans(recipe, monkeypatch, capsys):
    monkeypatch.chdir(recipe.parents[2])  # recipes name paths relative to the repository root
    if is_pipeline(recipe):
        _, steps = load_pipeline(recipe)
        assert steps
    else:
        cfg = load_recipe(recipe)
        assert cfg.stage in stage_names()
    rows = print_plan(str(recipe))
    assert rows and "r1pipe plan" in capsys.readouterr().out


@pytest.mark.parametrize("stage", stage_names())
def test_stage_help_lists_every_option(stage, capsys):
    config_cls, _ = get_stage(stage)
    with pytest.raises(SystemExit) as info:
        cli.main([stage, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for section, field in config_cls.model_fields.items():
        assert section in out
        sub = _section_class(field.annotation)
        for name in getattr(sub, "model_fields", {}):
            assert name in out, f"{stage} --help does not document {section}.{name}"


def test_top_level_help_and_tools():
    out = subprocess.run([sys.executable, "-m", "r1pipe", "--help"], capture_output=True, text=True, check=True).stdout
    for command in (*stage_names(), "run", "plan", "rewards"):
        assert command in out
    for tool in ("run", "plan", "rewards"):
        assert subprocess.run([sys.executable, "-m", "r1pipe", tool, "--help"], capture_output=True).returncode == 0


def test_module_entry_point_from_checkout_does_not_expose_top_level_folders():
    """`python -m r1pipe` in the checkout must not let transformers import the repo's `kernels/` folder."""
    out = subprocess.run([sys.executable, "-m", "r1pipe", "plan", "recipes/qwen2.5-1.5b/sft.yaml"],
                         capture_output=True, text=True, cwd=RECIPES_DIR.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "r1pipe plan" in out.stdout


def test_rewards_list_shows_builtins(capsys):
    assert cli.main(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("accuracy", "format", "code"):
        assert name in out


@pytest.mark.parametrize("override, expected", [
    ("model.path=/no/such/model", "model.path: no such model directory: /no/such/model"),
    ("data.sources.0.path=/no/such/data.jsonl", "data.sources.0.path: no such file: /no/such/data.jsonl"),
])
def test_missing_inputs_are_named_before_a_run_directory_exists(override, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(RECIPES_DIR.parent)
    code = cli.main(["sft", "recipes/demo/sft.yaml", override, f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1] == f"r1pipe: error: {expected}"
    assert not any(tmp_path.iterdir())
