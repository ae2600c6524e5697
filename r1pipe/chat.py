"""Tokenizers and chat formatting: from a record to the text (and tokens) a model sees, one way for every stage.

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
    cfg.data.install_template(tokenizer)                             # the recipe's chat template, or the tokenizer's
    messages, text, ids = cfg.data.prompt(tokenizer, record)        # system message, template, '<think>\\n' prefill

Recipe sections that format chats declare `chat_template`, `system_prompt` and `think_prefill` with the
field types below (each in its own place among the section's keys, which fixes the order of the resolved
config a run directory stores) and inherit the rendering from `ChatFormat`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from r1pipe.config import RecipeError
from r1pipe.rewards.think import THINK_END, THINK_START  # one home: the rewards parse the same tags

ChatTemplate = Annotated[str | None, Field(
    description="Jinja chat template (inline or a .jinja file); default: the tokenizer's.")]
SystemPrompt = Annotated[str | None, Field(description="System message for rows without a `system` field.")]
ThinkPrefill = Annotated[bool, Field(description="End every prompt with '<think>\\n' (R1 style).")]


def load_tokenizer(path: str, tokenizer: str | None = None):
    """The tokenizer at `tokenizer`, else the one stored with the model at `path`; a pad token is ensured
    (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    source = tokenizer or path
    try:
        loaded = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        key = "model.tokenizer" if tokenizer else "model.path"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"{key}: no tokenizer at {source!r} (set model.tokenizer): {first}") from None
    if loaded.pad_token_id is None:
        loaded.pad_token = loaded.eos_token
    return loaded


def r1_response(reasoning: str, answer: str) -> str:
    """R1's assistant turn: the chain of thought inside think tags, then the answer."""
    return f"{THINK_START}\n{reasoning.strip()}\n{THINK_END}\n{answer.strip()}"


def apply_template(tokenizer, chat_template: str | None) -> None:
    """Install the recipe's chat template (inline or .jinja file) on the tokenizer, or check it has one."""
    if chat_template:
        text = Path(chat_template).read_text() if chat_template.endswith(".jinja") else chat_template
        tokenizer.chat_template = text
    elif not getattr(tokenizer, "chat_template", None):
        raise RecipeError("data.chat_template: the tokenizer has no chat template; set one in the recipe")


def to_messages(record: dict, system_prompt: str | None = None) -> list[dict]:
    """A record (`messages`, or `prompt`/`completion`/`reasoning`/`system`) as chat messages."""
    if record.get("messages") is not None:
        return list(record["messages"])
    messages = []
    system = record.get("system") or system_prompt
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": record["prompt"]})
    if record.get("completion") is not None:
        reasoning = record.get("reasoning")
        content = r1_response(reasoning, record["completion"]) if reasoning else record["completion"]
        messages.append({"role": "assistant", "content": content})
    return messages


def render_prompt(tokenizer, messages: list[dict], think_prefill: bool = False) -> str:
    """The text a model continues: the conversation, the assistant header, optionally '<think>\\n'."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + f"{THINK_START}\n" if think_prefill else text


def encode_prompt(tokenizer, messages: list[dict], think_prefill: bool = False) -> tuple[str, list[int]]:
    """`render_prompt`'s text and its token ids (the template wrote the special tokens; none are added)."""
    text = render_prompt(tokenizer, messages, think_prefill)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


class ChatFormat:
    """Rendering for a recipe section with the fields `chat_template`, `system_prompt` and `think_prefill`."""

    def install_template(self, tokenizer) -> None:
        """The section's chat template on the tokenizer, or a check that the tokenizer has one."""
        apply_template(tokenizer, self.chat_template)

    def prompt(self, tokenizer, record: dict) -> tuple[list[dict], str, list[int]]:
        """A record's chat messages (the section's system message where it has none), the text the model
        continues and that text's token ids."""
        messages = to_messages(record, self.system_prompt)
        return (messages, *encode_prompt(tokenizer, messages, self.think_prefill))
