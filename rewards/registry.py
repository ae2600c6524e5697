"""Reward plug-ins: registration by decorator, entry-point discovery, loading by reference, options.

A reward scores each completion of a batch with a float, or None (no score). Two forms:

- per sample (default): `fn(prompt, completion, *, completion_ids=None, <columns>, <options>)`
  returns one value;
- batched (`@reward(..., batched=True)`): `fn(prompts, completions, *, completion_ids=None,
  <columns as lists>, <options>)` returns one value per completion.

Either may be `async def`. A class works too: its `__init__` keyword arguments are the options and
its instances are called like the function forms. Parameters of the call without a default (besides
prompt and completion) and names given in `columns=` are dataset columns the reward needs; keyword
parameters with a default are its options. A `**kwargs` parameter receives every column.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

ENTRY_POINT_GROUP = "r1pipe.rewards"
_FIXED = ("completion_ids",)


class RewardError(ValueError):
    """A reward is unknown, misconfigured, or (with on_error="abort") failed; one line."""


@dataclass
class RewardInfo:
    """What the registry knows about one reward."""

    name: str
    target: Callable  # the function, or the class to instantiate with the options
    batched: bool = False
    columns: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    accepts_all_columns: bool = False
    doc: str = ""

    @property
    def is_class(self) -> bool:
        return inspect.isclass(self.target)

    def validate_options(self, options: dict) -> dict:
        """Return the full option dict (defaults filled in); unknown or mistyped options are errors."""
        if not isinstance(options, dict):
            raise RewardError(f"reward {self.name!r}: options must be a mapping, got {type(options).__name__}")
        for key, value in options.items():
            if key not in self.options:
                hint = difflib.get_close_matches(str(key), list(self.options), n=1)
                known = ", ".join(self.options) or "none"
                did = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise RewardError(f"reward {self.name!r}: unknown option {key!r}{did}; options: {known}")
            _check_type(self.name, key, value, self.options[key])
        return {**self.options, **options}


def _check_type(reward: str, key: str, value, default) -> None:
    expected: tuple[type, ...] | None = None
    if isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, int):
        expected = (int,)
    elif isinstance(default, float):
        expected = (int, float)
    elif isinstance(default, str):
        expected = (str,)
    elif isinstance(default, (list, tuple)):
        expected = (list, tuple)
    if expected and (not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)):
        raise RewardError(f"reward {reward!r}: option {key!r} must be {expected[-1].__name__}, got {value!r}")


_REGISTRY: dict[str, RewardInfo] = {}
_ENTRY_POINTS_LOADED = False


def _describe(name: str, target: Callable, batched: bool, columns) -> RewardInfo:
    call = target.__call__ if inspect.isclass(target) else target
    signature = inspect.signature(call)
    params = list(signature.parameters.values())
    if inspect.isclass(target):
        params = params[1:]  # self
        init_params = list(inspect.signature(target.__init__).parameters.values())[1:]
        options = {p.name: p.default for p in init_params
                   if p.default is not inspect.Parameter.empty and p.kind != p.VAR_KEYWORD}
    else:
        options = {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        raise RewardError(f"reward {name!r}: must take (prompt(s), completion(s), ...) as its first two arguments")
    needed = list(columns)
    for p in params[2:] if len(positional) >= 2 else []:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in _FIXED or p.name in needed:
            continue
        if p.default is inspect.Parameter.empty:
            needed.append(p.name)
        elif not inspect.isclass(target):
            options[p.name] = p.default
    doc = inspect.getdoc(target) or ""
    return RewardInfo(
        name=name, target=target, batched=batched, columns=tuple(needed), options=options,
        accepts_all_columns=any(p.kind == p.VAR_KEYWORD for p in params), doc=doc.split("\n")[0],
    )


def reward(name: str | None = None, *, batched: bool = False, columns: tuple[str, ...] = ()):
    """Register a reward function or class under `name` (default: its own name)."""

    def decorate(target):
        info = _describe(name or target.__name__, target, batched, columns)
        _REGISTRY[info.name] = info
        target.__r1pipe_reward__ = info
        return target

    return decorate


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue
        try:
            target = entry.load()
        except Exception as err:  # noqa: BLE001  (a broken plug-in package must not break the others)
            print(f"r1pipe: reward plug-in {entry.name!r} ({entry.value}) failed to load: {err}", file=sys.stderr)
            continue
        _REGISTRY[entry.name] = getattr(target, "__r1pipe_reward__", None) or _describe(entry.name, target, False, ())


def _load_reference(spec: str) -> RewardInfo:
    location, _, attr = spec.rpartition(":")
    if location.endswith(".py") or "/" in location:
        path = Path(location)
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file not found: {path}")
        module_name = f"r1pipe_reward_plugin_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:  # the user's plug-in file: any error in it is theirs to fix, in one line
            sys.modules.pop(module_name, None)
            raise RewardError(f"reward {spec!r}: {path} failed to load: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as err:
            raise RewardError(f"reward {spec!r}: cannot import module {location!r} ({err})") from None
        except Exception as err:
            raise RewardError(f"reward {spec!r}: importing {location!r} failed: {type(err).__name__}: {err}") from None
    target = getattr(module, attr, None)
    if target is None or not callable(target):
        raise RewardError(f"reward {spec!r}: {location} has no callable {attr!r}")
    return getattr(target, "__r1pipe_reward__", None) or _describe(spec, target, False, ())


def load_reward(spec: str) -> RewardInfo:
    """A registered name, an entry-point name, `module.path:function` or `path/to/file.py:function`."""
    if not isinstance(spec, str) or not spec:
        raise RewardError(f"reward name must be a non-empty string, got {spec!r}")
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        return _load_reference(spec)
    _load_entry_points()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    hint = difflib.get_close_matches(spec, list(_REGISTRY), n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise RewardError(f"unknown reward {spec!r}{did}; available: {', '.join(sorted(_REGISTRY))}")


def describe_rewards() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, one-line doc, options with defaults) of every available reward, for `r1pipe rewards list`."""
    _load_entry_points()
    return [(info.name, info.doc, dict(info.options)) for info in sorted(_REGISTRY.values(), key=lambda i: i.name)]
