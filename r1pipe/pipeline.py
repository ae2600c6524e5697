"""Pipelines: several stage recipes run in order, each stage's outputs wired into later inputs.

    name: demo
    output_dir: runs            # stage runs go to runs/demo/<stage name>/
    stages:
      - name: base
        recipe: pretrain.yaml   # relative to this file
      - name: cold_start
        recipe: sft.yaml
        overrides: {model.path: "${base.checkpoint}"}

`${<stage name>.<output key>}` is replaced by that earlier stage's output (outputs.json). Every
stage recipe is validated before the first stage starts; a finished stage is skipped on rerun,
an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from r1pipe.config import (
    RecipeError,
    Section,
    StageConfig,
    apply_override,
    get_stage,
    parse_override,
    read_yaml,
    validate,
)
from r1pipe.rundir import RunDir
from r1pipe.runner import load_recipe_data, run_stage

REFERENCE = re.compile(r"\$\{([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\}")


class PipelineStage(Section):
    name: str = Field(description="Name of this step; later steps reference its outputs as ${name.key}.")
    recipe: Path = Field(description="Stage recipe, relative to the pipeline file.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Dotted keys set on the recipe, e.g. {model.path: '${base.checkpoint}'}."
    )

    @field_validator("name")
    @classmethod
    def _simple_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"{name!r}: use letters, digits, '_' and '-' only")
        return name


class PipelineConfig(Section):
    name: str = Field(description="Pipeline name; stage runs go to <output_dir>/<name>/<stage name>/.")
    output_dir: Path = Field(Path("runs"), description="Parent directory of the pipeline's run directories.")
    stages: list[PipelineStage] = Field(min_length=1, description="The steps, in order.")


class PlannedStage:
    """One validated step: its final config and the keys still waiting on earlier outputs.

    `preview` is its config with those references left as their `${...}` text (what `r1pipe plan` sizes
    before any step ran); None when a reference sits where only a resolved value validates."""

    def __init__(self, step: PipelineStage, data: dict, lines: dict, source: str, refs: dict[tuple, str],
                 preview: StageConfig | None):
        self.step, self.data, self.lines, self.source, self.refs = step, data, lines, source, refs
        self.preview = preview

    def resolve(self, outputs: dict[str, dict]) -> StageConfig:
        data = _substitute(self.data, outputs)
        config_cls, _ = get_stage(self.data["stage"])
        return validate(config_cls, data, self.source, self.lines)


def is_pipeline(path: str | Path) -> bool:
    data, _ = read_yaml(path)
    return "stages" in data and "stage" not in data


def load_pipeline(path: str | Path, overrides=()) -> tuple[PipelineConfig, list[PlannedStage]]:
    """Validate the pipeline and every stage recipe in it (references left for run time)."""
    path = Path(path)
    data, lines = read_yaml(path)
    stage_overrides: dict[str, list[str]] = {}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] in ("name", "output_dir"):
            apply_override(data, keys, value, origin=f"override {text!r}")
        else:
            stage_overrides.setdefault(keys[0], []).append(text.split(".", 1)[1] if len(keys) > 1 else text)
    pipeline = validate(PipelineConfig, data, str(path), lines)
    names = [s.name for s in pipeline.stages]
    for unknown in set(stage_overrides) - set(names):
        raise RecipeError(f"override {unknown}.…: no stage named {unknown!r} in {path} (stages: {', '.join(names)})")
    planned = []
    for index, step in enumerate(pipeline.stages):
        if names.index(step.name) != index:
            raise RecipeError(f"{path}: stages.{index}.name: {step.name!r} is used twice")
        recipe = step.recipe if step.recipe.is_absolute() else path.parent / step.recipe
        source = f"{recipe} (pipeline step {step.name!r})"
        data, rlines, stage = load_recipe_data(recipe)
        refs: dict[tuple, str] = {}
        for key, value in step.overrides.items():
            keys = key.split(".")
            apply_override(data, keys, value, origin=f"{path}: stages.{index}.overrides.{key}")
            rlines.pop(tuple(keys), None)
            for ref_stage, _ in REFERENCE.findall(str(value)) if isinstance(value, str) else []:
                if ref_stage not in names[:index]:
                    raise RecipeError(
                        f"{path}: stages.{index}.overrides.{key}: ${{{ref_stage}...}} does not name an earlier step"
                    )
                refs[tuple(keys)] = value
        for text in stage_overrides.get(step.name, []):
            keys, value = parse_override(text)
            apply_override(data, keys, value, origin=f"override {step.name}.{text}")
            rlines.pop(tuple(keys), None)
        data.setdefault("run", {})
        if not isinstance(data["run"], dict):
            raise RecipeError(f"{recipe}: run: must be a section")
        data["run"]["output_dir"] = str(pipeline.output_dir / pipeline.name)
        data["run"]["name"] = step.name
        config_cls, _ = get_stage(stage)
        preview = validate(config_cls, data, source, rlines, ignore=lambda loc, refs=refs: _under_reference(loc, refs))
        planned.append(PlannedStage(step, data, rlines, source, refs, preview))
    return pipeline, planned


def _under_reference(loc: tuple, refs: dict[tuple, str]) -> bool:
    """Errors at keys whose value is still a ${...} reference are checked again at run time."""
    return any(loc[: len(key)] == key for key in refs)


def _substitute(node, outputs: dict[str, dict]):
    if isinstance(node, dict):
        return {k: _substitute(v, outputs) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, outputs) for v in node]
    if not isinstance(node, str) or "${" not in node:
        return node

    def lookup(match: re.Match):
        stage, key = match.groups()
        produced = outputs.get(stage) or {}
        if key not in produced:
            raise RecipeError(f"${{{stage}.{key}}}: step {stage!r} produced no {key!r} (it produced: {', '.join(produced) or 'nothing'})")
        return produced[key]

    whole = REFERENCE.fullmatch(node)
    if whole:
        return lookup(whole)
    return REFERENCE.sub(lambda m: str(lookup(m)), node)


def run_pipeline(path: str | Path, overrides=(), overwrite: bool = False, only: list[str] | None = None) -> dict:
    """Run (or resume) every step in order; returns each step's outputs."""
    pipeline, planned = load_pipeline(path, overrides)
    if only:
        unknown = [n for n in only if n not in [p.step.name for p in planned]]
        if unknown:
            raise RecipeError(f"--only {unknown[0]}: no such step in {path}")
    outputs: dict[str, dict] = {}
    started = time.time()
    for item in planned:
        cfg = item.resolve(outputs)
        if only and item.step.name not in only:
            done = (cfg.run.path / "outputs.json").is_file()
            if not done:
                raise RecipeError(f"step {item.step.name!r} has not run yet; it must run before {only[0]!r}")
            outputs[item.step.name] = RunDir(cfg.run.path).read_outputs()
            continue
        outputs[item.step.name] = run_stage(cfg, overwrite=overwrite)
    summary = pipeline.output_dir / pipeline.name / "pipeline.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"seconds": round(time.time() - started, 1), "outputs": outputs}, indent=2, default=str))
    return outputs
