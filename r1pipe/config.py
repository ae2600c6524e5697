"""Recipes: one YAML file per stage, parsed into typed configs and validated before any heavy work.

A user's mistake (unknown key, wrong type, value out of range, missing file, incompatible options)
becomes one `RecipeError` line naming the file, the line and the key, with a did-you-mean for typos.
pydantic does the type checking; this module only maps its errors back to the YAML source.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

class RecipeError(Exception):
    """A user-facing configuration error; its message is a single line."""


def split_evenly(total: int, parts: int, message: str, error: type[Exception] = RecipeError) -> int:
    """`total // parts`, or `error(message)` when `parts` does not divide `total` (a batch that must split
    into ranks, micro batches or groups; ValueError inside a section's validator)."""
    if total % parts:
        raise error(message)
    return total // parts


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


def _must_exist(path: Path) -> Path:
    if not Path(path).exists():
        raise ValueError(f"no such file or directory: {path}")
    return path


ExistingPath = typing.Annotated[Path, AfterValidator(_must_exist)]
"""A path that must exist when the recipe is loaded (relative paths are relative to the cwd)."""


class RunSection(Section):
    name: str = Field(description="Run name; everything the run writes goes to <output_dir>/<name>/.")
    output_dir: Path = Field(Path("runs"), description="Parent directory of run directories.")
    seed: int = Field(0, ge=0, description="Seed for python, numpy and torch (data order, init, sampling).")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Metric sinks besides metrics.jsonl (wandb needs `pip install wandb`).",
    )

    @property
    def path(self) -> Path:
        return self.output_dir / self.name


@dataclass(frozen=True)
class Workload:
    """What a stage's run loads and processes, as `r1pipe plan` sizes it (None: the stage has no such figure)."""

    model_path: str | None = None  # the model the run loads (directory, hub id or preset)
    model_dtype: str = "float32"  # the dtype its weights load in
    lora: bool = False  # only LoRA adapters train
    precision: str = "fp32"  # train.precision
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0: none)
    gradient_checkpointing: bool = False
    micro_batch_size: int | None = None  # sequences per forward on one device
    sequence_length: int | None = None  # tokens of one sequence at most
    sequences_per_step: int | None = None  # sequences per optimizer step, over all devices
    reference_model: bool = False  # a frozen copy of the weights beside the policy (GRPO's KL reference)
    devices: int = 1  # devices the recipe runs on at least


class StageConfig(Section):
    """Base of each stage's config; stages add their own sections and say what they load (`workload`)."""

    stage: str = Field(description="Which stage this recipe configures (a stage command of `r1pipe --help`).")
    run: RunSection = Field(description="Run name, output directory, seed and metric sinks.")

    def workload(self) -> Workload:
        """What the run loads and processes, for `r1pipe plan`; stages that load a model say which."""
        return Workload()


# ----------------------------------------------------------------------------------------------
# Stage registry: each module of r1pipe/stages registers itself when imported; importing the
# package r1pipe.stages registers them all (r1pipe.runner does, and reads the registry through these).


StageFn = Callable[[Any, Any], dict]
_STAGES: dict[str, tuple[type[StageConfig], StageFn]] = {}
_SUMMARIES: dict[str, str] = {}


def register_stage(name: str, config_cls: type[StageConfig], *, summary: str) -> Callable[[StageFn], StageFn]:
    """Register `run(cfg, run_dir) -> outputs` as stage `name`: its recipes validate against `config_cls`,
    and `summary` is its line in `r1pipe --help`."""

    def decorate(fn: StageFn) -> StageFn:
        _STAGES[name] = (config_cls, fn)
        _SUMMARIES[name] = summary
        return fn

    return decorate


def stage_summaries() -> dict[str, str]:
    """name -> one-line summary of every registered stage, in registration order (the pipeline's)."""
    return dict(_SUMMARIES)


def get_stage(name: str) -> tuple[type[StageConfig], StageFn]:
    """The (config class, run function) registered as stage `name`."""
    if name not in _STAGES:
        raise RecipeError(f"unknown stage {name!r}{did_you_mean(name, _STAGES)}; stages: {', '.join(_STAGES)}")
    return _STAGES[name]


# ----------------------------------------------------------------------------------------------
# YAML with line numbers


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _line_index(node: yaml.Node, prefix: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each key path (tuple of keys / list indices) to its 1-based line in the YAML source."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            out[path] = key_node.start_mark.line + 1
            _line_index(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _line_index(item, prefix + (i,), out)
    return out


def read_yaml(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    """Read a YAML mapping and the line of each key; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data, (_line_index(root) if root is not None else {})


# ----------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any, origin: str) -> None:
    """Set a dotted key in nested dicts/lists, creating mappings on the way."""
    node = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, origin)]
            continue
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], (dict, list)):
            raise RecipeError(f"{origin}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        index = _list_index(node, last, origin)
        node[index] = value
    else:
        node[last] = value


def _list_index(node: list, key: str, origin: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(f"{origin}: {key!r} is not an index of a list of {len(node)} items")
    return int(key)


# ----------------------------------------------------------------------------------------------
# Validation errors -> one line


def _section_class(annotation) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `X`, `X | None`, `list[X]`, `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _section_class(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple, dict):
        for arg in typing.get_args(annotation):
            found = _section_class(arg)
            if found is not None:
                return found
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Follow a pydantic error location (field names, list indices) through the schema."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or part not in model.model_fields:
            continue
        model = _section_class(model.model_fields[part].annotation)
    return model


def _format_error(err: dict, root: type[BaseModel], source: str, lines: dict[tuple, int]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    key = ".".join(str(p) for p in loc) or "(recipe)"
    line = None
    for n in range(len(loc), 0, -1):
        line = lines.get(loc[:n])
        if line:
            break
    where = f"{source}:{line}" if line else source
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        allowed = list(parent.model_fields) if parent else []
        hint = did_you_mean(loc[-1], allowed)
        return f"{where}: {key}: unknown key{hint}" + (f"; allowed: {', '.join(allowed)}" if not hint else "")
    if kind == "missing":
        return f"{where}: {key}: required key is missing"
    message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind.startswith(("int_", "float_", "bool_", "string_", "literal_", "enum", "path", "list_", "dict_")):
        message += f" (got {err.get('input')!r})"
    return f"{where}: {key}: {message}"


def validate(
    cls: type[BaseModel],
    data: dict,
    source: str,
    lines: dict[tuple, int] | None = None,
    ignore: Callable[[tuple], bool] = lambda loc: False,
):
    """Validate `data` against `cls`; raise RecipeError for the first error not `ignore`d."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if not ignore(tuple(e["loc"]))]
        # A typo shows up as an unknown key plus a missing one; the unknown key explains both.
        errors.sort(key=lambda e: e["type"] != "extra_forbidden")
        if not errors:
            return None
        first = _format_error(errors[0], cls, source, lines or {})
        more = f" (+{len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise RecipeError(first + more) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what the run directory stores and compares on resume)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
