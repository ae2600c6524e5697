"""The demo's tokenizer, built by code: character-level, with R1's chat and think format.

Why hand-built rather than a downloaded one: the demo runs without network, and a ~110-token
character vocabulary keeps the tiny models' embedding and output head small while every digit
stays its own token (the task is digit arithmetic). It is a real `tokenizers` WordLevel model
over single characters (one pre-tokenizer split per character), wrapped as a Hugging Face
``PreTrainedTokenizerFast``, so `transformers`, TRL and vLLM load it from its directory.

``<think>``, ``</think>`` and ``\\boxed{`` are single added tokens that are *not* special, so
decoding with ``skip_special_tokens=True`` keeps the think block and the boxed answer for the
rewards. So are the signed digits ``+1``..``+9`` and ``-1``..``-9`` (as numbers are in a BPE
vocabulary): a step's operand is one token, which makes the task's signed intermediate result an
additive function of two tokens (see r1pipe.demo.task).
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from r1pipe.rewards.think import THINK_END, THINK_START

PAD, UNK, EOS = "<|pad|>", "<|unk|>", "<|end|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
BOXED = "\\boxed{"
SPECIAL_TOKENS = (PAD, UNK, EOS, SYSTEM, USER, ASSISTANT)
SIGNED_DIGITS = tuple(f"{sign}{digit}" for sign in "+-" for digit in range(1, 10))
WORD_TOKENS = (THINK_START, THINK_END, BOXED, *SIGNED_DIGITS)
CHARACTERS = "\n" + "".join(c for c in string.printable if c.isprintable())
MODEL_MAX_LENGTH = 512

# R1-style template: the assistant turn opens with the generation prompt and ends with EOS; a
# previous assistant turn keeps only its answer (R1 drops earlier reasoning from the context).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{% set content = message['content'] %}"
    "{% if not loop.last and '" + THINK_END + "' in content %}"
    "{% set content = content.split('" + THINK_END + "')[-1].lstrip() %}{% endif %}"
    "{{ content }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Build the demo tokenizer; save it (tokenizer.json + config + chat template) to ``out_dir``."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *WORD_TOKENS, *CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(WORD_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
