"""From a recipe to a finished run: every stage registered, a recipe loaded into its stage's config, the
stage run in its run directory. The CLI, pipelines and `plan` all come through here.

    cfg = load_recipe("recipes/demo/sft.yaml", ["train.lr=1e-4"])   # validated StageConfig
    outputs = run_stage(cfg)                                         # resumes, or returns a finished run's outputs
"""

from __future__ import annotations

import os
from pathlib import Path

import r1pipe.stages  # noqa: F401  (importing the package registers every stage)
from r1pipe.config import (
    RecipeError,
    StageConfig,
    apply_override,
    did_you_mean,
    get_stage,
    parse_override,
    read_yaml,
    stage_summaries,
    validate,
)
from r1pipe.data import DATA_FILE_SUFFIXES
from r1pipe.rundir import RunDir, seed_everything


def stage_names() -> tuple[str, ...]:
    """Every stage, in the order of the R1 pipeline."""
    return tuple(stage_summaries())


def load_recipe_data(path: str | Path, overrides=(), stage: str | None = None) -> tuple[dict, dict, str]:
    """Read a recipe, apply `key=value` overrides and settle its stage; returns (data, lines, stage)."""
    data, lines = read_yaml(path)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, origin=f"override {text!r}")
        lines.pop(tuple(keys), None)
    declared = data.get("stage")
    if stage is not None and declared is not None and declared != stage:
        raise RecipeError(f"{path}:{lines.get(('stage',), 1)}: stage: this recipe is for {declared!r}, not {stage!r}")
    data["stage"] = stage = declared or stage
    names = stage_names()
    if stage is None:
        raise RecipeError(f"{path}: stage: required key is missing (one of {', '.join(names)})")
    if not isinstance(stage, str) or stage not in names:
        raise RecipeError(f"{path}:{lines.get(('stage',), 1)}: stage: unknown stage {stage!r}{did_you_mean(stage, names)}")
    return data, lines, stage


def load_recipe(path: str | Path, overrides=(), stage: str | None = None) -> StageConfig:
    """Read, override and validate a stage recipe into its typed config."""
    data, lines, stage = load_recipe_data(path, overrides, stage)
    config_cls, _ = get_stage(stage)
    return validate(config_cls, data, str(path), lines)


def check_local_inputs(cfg: StageConfig) -> None:
    """Before a run directory is made: a model or data path that can only be local must exist.

    Recipes may name hub ids (`name`, `org/name`) and presets too, and pipelines fill paths in from
    earlier steps, so this runs on the final config rather than in the schema."""
    for section in ("model", "teacher"):
        path = getattr(getattr(cfg, section, None), "path", None)
        if isinstance(path, str) and _only_local(path) and not Path(path).exists():
            raise RecipeError(f"{section}.path: no such model directory: {_where(path)}")
    for index, source in enumerate(getattr(getattr(cfg, "data", None), "sources", None) or []):
        if (_only_local(source.path) or source.path.endswith(DATA_FILE_SUFFIXES)) and not Path(source.path).exists():
            raise RecipeError(f"data.sources.{index}.path: no such file: {_where(source.path)}")


def _only_local(path: str) -> bool:
    """Not a hub id: absolute, explicitly relative, or deeper than `org/name`."""
    return path.startswith(("/", ".", "~")) or path.count("/") >= 2


def _where(path: str) -> str:
    return path if Path(path).is_absolute() else f"{path} (relative to {Path.cwd()})"


def run_stage(cfg: StageConfig, overwrite: bool = False) -> dict:
    """Open (or resume) the run directory and run the stage; a finished run is not redone."""
    _, run_fn = get_stage(cfg.stage)
    check_local_inputs(cfg)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun/deepspeed only rank 0 owns the run dir
    run_dir = RunDir.open(cfg, overwrite=overwrite, main_process=main_process)
    done = run_dir.read_outputs()
    if done is not None:
        run_dir.logger.info("%s is complete already (outputs.json); nothing to do", run_dir.path)
        return done
    seed_everything(cfg.run.seed)
    run_dir.logger.info("stage %s -> %s", cfg.stage, run_dir.path)
    try:
        outputs = run_fn(cfg, run_dir) or {}
        if not main_process:
            return outputs
        run_dir.write_outputs(outputs)
    finally:
        run_dir.close()
    return run_dir.read_outputs()  # JSON-plain (paths as strings), exactly what a resumed pipeline sees
