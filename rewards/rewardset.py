"""A recipe's weighted rewards, scored together on a batch of completions.

Failure policy: a reward that raises, returns the wrong number of values, or returns a non-finite
or non-numeric value leaves the affected samples unscored (None) and adds an error naming the reward
and the sample; with `on_error="abort"` the first such error raises `RewardError` instead.

Total: `total[i] = sum(weight_r * value_r[i])` over the rewards that scored sample i; a None
contributes nothing (the sample is neither rewarded nor punished by that reward). `scored[i]` tells
whether any reward scored sample i; a sample no reward scored has total 0.0.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from r1pipe.rewards.registry import RewardError, RewardInfo, load_reward


class RewardSpec(BaseModel):
    """One reward of a recipe: `{name: accuracy, weight: 1.0, options: {timeout: 5}}`.

    Validated like every recipe section (`r1pipe.config.Section`: unknown keys are errors, defaults are
    validated too), but defined here so the rewards layer does not depend on the app.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())

    name: str = Field(description="Registered reward name, `module.path:function` or `path/to/file.py:function`.")
    weight: float = Field(1.0, description="Multiplier of this reward in the total.")
    options: dict[str, Any] = Field(default_factory=dict, description="The reward's options (`r1pipe rewards list`).")

    @model_validator(mode="after")
    def _known_reward_and_options(self):
        if not math.isfinite(self.weight):
            raise ValueError(f"reward {self.name!r}: weight must be finite, got {self.weight}")
        load_reward(self.name).validate_options(self.options)
        return self


@dataclass
class RewardResult:
    per_reward: dict[str, list[float | None]]
    total: list[float]
    errors: list[str] = field(default_factory=list)

    @property
    def scored(self) -> list[bool]:
        columns = list(self.per_reward.values())
        return [any(values[i] is not None for values in columns) for i in range(len(self.total))]


class _Bound:
    """A reward with its options applied, ready to score a batch."""

    def __init__(self, info: RewardInfo, options: dict):
        self.info = info
        if info.is_class:
            self.call = info.target(**options)
            self.kwargs = {}
        else:
            self.call = info.target
            self.kwargs = options
        call = self.call.__call__ if info.is_class else self.call
        self.is_async = inspect.iscoroutinefunction(call)

    def score(self, prompts, completions, completion_ids, columns) -> tuple[list, list[str]]:
        """Values (None where unscored) and error messages for one batch."""
        n, name = len(completions), self.info.name
        wanted = columns if self.info.accepts_all_columns else {k: columns[k] for k in self.info.columns}
        if self.info.batched:
            try:
                values = self._run_batched(prompts, completions, completion_ids, wanted)
            except RewardError:
                raise  # a configuration mistake (missing column, bad option value), not a scoring failure
            except Exception as err:  # noqa: BLE001  (a plug-in's failure is reported, not fatal)
                return [None] * n, [f"reward {name!r} raised on samples 0-{n - 1}: {type(err).__name__}: {err}"]
            if not isinstance(values, (list, tuple)) and not hasattr(values, "tolist"):
                return [None] * n, [f"reward {name!r} returned {type(values).__name__}, expected a list of {n} values"]
            values = list(values.tolist() if hasattr(values, "tolist") else values)
            if len(values) != n:
                return [None] * n, [f"reward {name!r} returned {len(values)} values for {n} completions"]
            errors: list[str] = []
        else:
            values, errors = self._run_per_sample(prompts, completions, completion_ids, wanted)
        checked = []
        for i, value in enumerate(values):
            value, problem = _as_score(value)
            if problem:
                errors.append(f"reward {name!r} sample {i}: {problem}")
            checked.append(value)
        return checked, errors

    def _run_batched(self, prompts, completions, completion_ids, columns):
        result = self.call(prompts, completions, completion_ids=completion_ids, **columns, **self.kwargs)
        return asyncio.run(result) if self.is_async else result

    def _one(self, i, prompts, completions, completion_ids, columns):
        row = {key: values[i] for key, values in columns.items()}
        ids = completion_ids[i] if completion_ids is not None else None
        return self.call(prompts[i], completions[i], completion_ids=ids, **row, **self.kwargs)

    def _run_per_sample(self, prompts, completions, completion_ids, columns):
        n, name = len(completions), self.info.name
        values: list = [None] * n
        errors: list[str] = []

        def failed(i, err):
            errors.append(f"reward {name!r} sample {i}: {type(err).__name__}: {err}")

        if self.is_async:
            async def gather():
                calls = [self._one(i, prompts, completions, completion_ids, columns) for i in range(n)]
                return await asyncio.gather(*calls, return_exceptions=True)

            for i, value in enumerate(asyncio.run(gather())):
                if isinstance(value, RewardError):
                    raise value
                if isinstance(value, Exception):
                    failed(i, value)
                else:
                    values[i] = value
            return values, errors
        for i in range(n):
            try:
                values[i] = self._one(i, prompts, completions, completion_ids, columns)
            except RewardError:
                raise
            except Exception as err:  # noqa: BLE001
                failed(i, err)
        return values, errors


def _as_score(value) -> tuple[float | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, bool):
        return float(value), None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"returned {type(value).__name__} {value!r:.60}, expected a float or None"
    if not math.isfinite(number):
        return None, f"returned non-finite value {number}"
    return number, None


class RewardSet:
    """Weighted rewards of a recipe; `score` runs them concurrently on one batch."""

    def __init__(self, specs, on_error: Literal["skip", "abort"] = "skip", max_workers: int | None = None):
        if on_error not in ("skip", "abort"):
            raise RewardError(f"rewards on_error must be 'skip' or 'abort', got {on_error!r}")
        self.specs = [_as_spec(spec) for spec in specs]
        if not self.specs:
            raise RewardError("rewards: at least one reward is needed")
        names = [spec.name for spec in self.specs]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise RewardError(f"rewards: {duplicate!r} is listed twice")
        self.on_error = on_error
        self.bound = [_Bound(load_reward(s.name), load_reward(s.name).validate_options(s.options)) for s in self.specs]
        self.columns = sorted({c for b in self.bound for c in b.info.columns})
        self._pool = ThreadPoolExecutor(max_workers or len(self.bound), thread_name_prefix="reward")

    def score(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None,
              **columns: list) -> RewardResult:
        n = len(completions)
        if len(prompts) != n:
            raise RewardError(f"rewards: {len(prompts)} prompts for {n} completions")
        if completion_ids is not None and len(completion_ids) != n:
            raise RewardError(f"rewards: {len(completion_ids)} completion_ids for {n} completions")
        for key, values in columns.items():
            if len(values) != n:
                raise RewardError(f"rewards: column {key!r} has {len(values)} values for {n} completions")
        for bound in self.bound:
            missing = [c for c in bound.info.columns if c not in columns]
            if missing:
                raise RewardError(f"reward {bound.info.name!r} needs dataset column {missing[0]!r}; "
                                  f"columns given: {', '.join(sorted(columns)) or 'none'}")
        futures = [self._pool.submit(b.score, prompts, completions, completion_ids, columns) for b in self.bound]
        per_reward: dict[str, list[float | None]] = {}
        errors: list[str] = []
        total = [0.0] * n
        for spec, future in zip(self.specs, futures, strict=True):
            values, reward_errors = future.result()
            if reward_errors and self.on_error == "abort":
                raise RewardError(reward_errors[0])
            errors.extend(reward_errors)
            per_reward[spec.name] = values
            for i, value in enumerate(values):
                if value is not None:
                    total[i] += spec.weight * value
        return RewardResult(per_reward=per_reward, total=total, errors=errors)

    def close(self):
        self._pool.shutdown(wait=True)


def _as_spec(spec) -> RewardSpec:
    if isinstance(spec, RewardSpec):
        return spec
    if isinstance(spec, (str, dict)):
        try:
            return RewardSpec(name=spec) if isinstance(spec, str) else RewardSpec(**spec)
        except ValidationError as err:  # pydantic wraps our RewardError; surface its first line
            raise RewardError(_first_message(err)) from None
    raise RewardError(f"rewards: a reward is a name or {{name, weight, options}}, got {spec!r}")


def _first_message(err: ValidationError) -> str:
    first = err.errors()[0]
    message = str(first.get("ctx", {}).get("error") or first.get("msg"))
    location = ".".join(str(part) for part in first.get("loc", ()))
    return f"reward {location}: {message}" if location else message
