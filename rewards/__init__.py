"""Rewards for GRPO and evaluation: plug-in registry, built-in rewards, math verification, code sandbox.

    from r1pipe.rewards import RewardSet
    rewards = RewardSet([{"name": "accuracy"}, {"name": "format", "weight": 0.5}])
    result = rewards.score(prompts, completions, completion_ids, answer=answers)

See docs/REWARDS.md for writing a plug-in and the built-ins' options.
"""

from r1pipe.rewards import builtin  # noqa: F401  (registers the built-in rewards)
from r1pipe.rewards.registry import RewardError, RewardInfo, describe_rewards, load_reward, reward
from r1pipe.rewards.rewardset import RewardResult, RewardSet, RewardSpec

__all__ = [
    "RewardError", "RewardInfo", "RewardResult", "RewardSet", "RewardSpec", "describe_rewards", "load_reward",
    "reward",
]
