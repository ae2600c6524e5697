"""Prompts for sampling stages (GRPO, distillation): a dataset's rows rendered with the chat template, and
the epoch-shuffled order in which they are drawn.

    prompts, stats = build_prompts(cfg.data, tokenizer, max_prompt_length, seed)   # Prompt per row
    sampler = PromptSampler(len(prompts), seed, cfg.data.shuffle)
    indices = sampler.take(n)                                                     # the next n prompts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from r1pipe.chat import ChatFormat, ChatTemplate, SystemPrompt, ThinkPrefill
from r1pipe.config import RecipeError, Section
from r1pipe.data import SourceSection, load_mixture
from r1pipe.seeds import EpochOrder

PROMPT_FIELDS = ("prompt", "messages", "system")


class PromptDataSection(Section, ChatFormat):
    """The prompts GRPO samples from, and the columns the rewards read."""

    sources: list[SourceSection] = Field(
        min_length=1, description="Datasets with `prompt` (or `messages`) per row, mixed by weight."
    )
    reward_columns: list[str] = Field(
        default_factory=lambda: ["answer"],
        description="Columns passed to the reward functions (e.g. answer for math, test_list for code).",
    )
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded by run.seed).")
    chat_template: ChatTemplate = None
    system_prompt: SystemPrompt = None
    think_prefill: ThinkPrefill = False


@dataclass
class Prompt:
    """One prompt: its chat messages (distillation writes them back out), the rendered text, its token ids
    and the reward columns of its row."""

    messages: list[dict]
    text: str
    ids: list[int]
    columns: dict[str, Any]


def build_prompts(data: PromptDataSection, tokenizer, max_prompt_length: int | None, seed: int
                  ) -> tuple[list[Prompt], dict]:
    """Render every row with the chat template; rows over ``max_prompt_length`` tokens (if set) are skipped
    and counted."""
    data.install_template(tokenizer)
    dataset = load_mixture(data, PROMPT_FIELDS + tuple(data.reward_columns), seed)
    missing = [c for c in data.reward_columns if c not in dataset.column_names]
    if missing:
        raise RecipeError(
            f"data.reward_columns: {missing[0]!r} is not a column of the prompt data "
            f"(columns: {', '.join(dataset.column_names)}); map it with data.sources.N.columns"
        )
    prompts, skipped = [], 0
    for row, record in enumerate(dataset):
        if record.get("prompt") is None and record.get("messages") is None:
            raise RecipeError(f"data: row {row} has neither `prompt` nor `messages`")
        messages, text, ids = data.prompt(tokenizer, {k: record.get(k) for k in PROMPT_FIELDS})
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            skipped += 1
            continue
        prompts.append(Prompt(messages, text, ids, {c: record[c] for c in data.reward_columns}))
    if not prompts:
        raise RecipeError(f"data: no prompt fits grpo.max_prompt_length={max_prompt_length} ({skipped} skipped)"
                          if skipped else "data: the prompt sources are empty")
    return prompts, {"data/prompts": len(prompts), "data/prompts_too_long": skipped}


class PromptSampler:
    """Deterministic epoch-shuffled prompt order; its position (prompts consumed) is the resume state."""

    def __init__(self, count: int, seed: int, shuffle: bool):
        self.count, self.consumed = count, 0
        self.order = EpochOrder(count, seed, shuffle)

    def take(self, n: int) -> list[int]:
        indices = [self.order[position] for position in range(self.consumed, self.consumed + n)]
        self.consumed += n
        return indices

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state["count"] != self.count:
            raise RecipeError(f"resume: the checkpoint saw {state['count']} prompts, the recipe now gives {self.count}")
        self.consumed = state["consumed"]
