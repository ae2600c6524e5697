"""Reward plug-ins: registration, discovery, loading by reference, options, failures and totals."""
import asyncio
import importlib
import math
import sys
import textwrap
import time

import pytest

import r1pipe.rewards.registry as registry
from r1pipe.rewards import RewardError, RewardSet, RewardSpec, describe_rewards, load_reward, reward


@pytest.fixture(scope="module", autouse=True)
def _unregister_test_rewards():
    """The rewards below exist for these tests only; keep other test modules' registry clean."""
    yield
    for name in [name for name in registry._REGISTRY if name.startswith("test_")]:
        del registry._REGISTRY[name]


@reward("test_len_ratio")
def len_ratio(prompt, completion, *, completion_ids=None, scale: float = 1.0):
    """Completion length over prompt length, times scale."""
    return scale * len(completion) / max(1, len(prompt))


@reward("test_batched_flags", batched=True, columns=("flag",))
def batched_flags(prompts, completions, *, completion_ids=None, flag, bonus: int = 0):
    """1 + bonus where flag is set."""
    return [float(f) + bonus if f else 0.0 for f in flag]


@reward("test_async")
async def async_reward(prompt, completion, *, completion_ids=None, delay: float = 0.05):
    """Sleeps, then scores the number of completion tokens."""
    await asyncio.sleep(delay)
    return float(len(completion_ids))


@reward("test_class")
class Contains:
    """1.0 if the completion contains the word."""

    def __init__(self, word: str = "yes"):
        self.word = word

    def __call__(self, prompt, completion, *, completion_ids=None):
        return float(self.word in completion)


@reward("test_flaky")
def flaky(prompt, completion, *, completion_ids=None):
    """Raises on 'boom', returns nan on 'nan', a string on 'str'."""
    if completion == "boom":
        raise RuntimeError("exploded")
    if completion == "nan":
        return math.nan
    if completion == "str":
        return "high"
    return None if completion == "none" else 1.0


@reward("test_short_batch", batched=True)
def short_batch(prompts, completions, *, completion_ids=None):
    """Returns one value too few."""
    return [1.0] * (len(completions) - 1)


def test_forms_options_and_weighted_total():
    rewards = RewardSet([
        {"name": "test_len_ratio", "weight": 2.0, "options": {"scale": 0.5}},
        {"name": "test_batched_flags", "options": {"bonus": 1}},
        "test_class",
    ])
    result = rewards.score(["ab", "ab"], ["abcd", "yes"], [[1], [2]], flag=[True, False])
    assert result.per_reward == {"test_len_ratio": [1.0, 0.75], "test_batched_flags": [2.0, 0.0],
                                 "test_class": [0.0, 1.0]}
    assert result.total == [2.0 + 2.0 + 0.0, 1.5 + 0.0 + 1.0]
    assert result.errors == []


def test_async_per_sample_rewards_run_concurrently():
    rewards = RewardSet([{"name": "test_async", "options": {"delay": 0.2}}])
    t0 = time.monotonic()
    result = rewards.score(["p"] * 8, ["c"] * 8, [[1, 2, 3]] * 8)
    assert result.per_reward["test_async"] == [3.0] * 8
    assert time.monotonic() - t0 < 1.0  # 8 x 0.2 s sequentially would be 1.6 s


def test_failures_leave_samples_unscored_and_are_reported():
    rewards = RewardSet(["test_flaky", "test_class"])
    result = rewards.score(["p"] * 5, ["ok yes", "boom", "nan", "str", "none"])
    assert result.per_reward["test_flaky"] == [1.0, None, None, None, None]
    assert result.total == [2.0, 0.0, 0.0, 0.0, 0.0]
    assert result.scored == [True, True, True, True, True]
    assert len(result.errors) == 3
    assert "reward 'test_flaky' sample 1: RuntimeError: exploded" in result.errors[0]
    assert "sample 2: returned non-finite value nan" in result.errors[1]
    assert "sample 3" in result.errors[2]
    short = RewardSet(["test_short_batch"]).score(["p"] * 3, ["a", "b", "c"])
    assert short.per_reward["test_short_batch"] == [None] * 3
    assert short.errors == ["reward 'test_short_batch' returned 2 values for 3 completions"]


def test_abort_turns_the_first_error_into_an_exception():
    with pytest.raises(RewardError, match="reward 'test_flaky' sample 1: RuntimeError: exploded"):
        RewardSet(["test_flaky"], on_error="abort").score(["p", "p"], ["ok", "boom"])


def test_user_mistakes_are_one_line_errors():
    with pytest.raises(RewardError, match=r"unknown option 'scael' \(did you mean 'scale'\?\); options: scale"):
        RewardSet([{"name": "test_len_ratio", "options": {"scael": 2}}])
    with pytest.raises(RewardError, match=r"unknown reward 'acuracy' \(did you mean 'accuracy'\?\)"):
        RewardSet(["acuracy"])
    with pytest.raises(RewardError, match="option 'scale' must be float, got 'big'"):
        RewardSet([{"name": "test_len_ratio", "options": {"scale": "big"}}])
    with pytest.raises(RewardError, match="needs dataset column 'flag'"):
        RewardSet(["test_batched_flags"]).score(["p"], ["c"])
    with pytest.raises(RewardError, match="column 'flag' has 2 values for 1 completions"):
        RewardSet(["test_batched_flags"]).score(["p"], ["c"], flag=[1, 2])
    with pytest.raises(RewardError, match="listed twice"):
        RewardSet(["test_class", "test_class"])
    with pytest.raises(RewardError, match="file not found"):
        load_reward("nowhere/plugin.py:score")


def test_recipe_section_validates_reward_names():
    from pydantic import ValidationError

    assert RewardSpec(name="format", weight=0.5).weight == 0.5
    with pytest.raises(ValidationError, match="unknown option 'thinktag'"):
        RewardSpec(name="format", options={"thinktag": "x"})


def test_load_by_file_path_and_module_path(tmp_path, monkeypatch):
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(textwrap.dedent('''
        def shouty(prompt, completion, *, completion_ids=None, factor: float = 1.0):
            """Share of upper-case letters."""
            letters = [c for c in completion if c.isalpha()]
            return factor * sum(c.isupper() for c in letters) / max(1, len(letters))
    '''))
    by_file = RewardSet([{"name": f"{plugin}:shouty", "options": {"factor": 2.0}}])
    assert by_file.score(["p"], ["ABcd"]).per_reward[f"{plugin}:shouty"] == [1.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:shouty").options == {"factor": 1.0}
    with pytest.raises(RewardError, match="has no callable 'missing'"):
        load_reward("my_rewards:missing")
    broken = tmp_path / "broken_rewards.py"
    broken.write_text("def score(:\n")
    with pytest.raises(RewardError, match=r"broken_rewards.py failed to load: SyntaxError"):
        load_reward(f"{broken}:score")


def test_entry_point_discovery(tmp_path, monkeypatch):
    package = tmp_path / "ext_rewards_pkg.py"
    package.write_text("def exclaim(prompt, completion, *, completion_ids=None):\n    return float('!' in completion)\n")
    dist = tmp_path / "ext_rewards_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-rewards-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[r1pipe.rewards]\nexclaim = ext_rewards_pkg:exclaim\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "exclaim" in [name for name, _, _ in describe_rewards()]
    assert RewardSet(["exclaim"]).score(["p", "p"], ["hi!", "hi"]).total == [1.0, 0.0]
    sys.modules.pop("ext_rewards_pkg", None)


def test_describe_rewards_lists_builtins_with_options():
    described = {name: (doc, options) for name, doc, options in describe_rewards()}
    for name in ("accuracy", "format", "tag_count", "reasoning_steps", "length", "cosine_length",
                 "repetition_penalty", "soft_overlong", "language_consistency", "countdown", "code", "code_format"):
        assert name in described and described[name][0], name
    assert described["soft_overlong"][1] == {"max_length": 4096, "cache_length": 512}
    assert described["test_class"][1] == {"word": "yes"}
