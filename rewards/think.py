"""Think blocks and the scripts of their words: the parsing that rewards and distillation filters share.

A reasoning completion is `<think>reasoning</think>answer`. The `format` and `code_format` rewards
match that shape (`think_pattern`), `language_consistency` measures the reasoning's language
(`reasoning`, `language_share`), and the distillation stage's rejection filters take a completion
apart (`split_think`) and reject mixed-language reasoning (`foreign_word_share`).
"""

from __future__ import annotations

import re
import unicodedata

from r1pipe.rewards.registry import RewardError

THINK_START, THINK_END = "<think>", "</think>"


def split_think(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) of ``<think>reasoning</think>answer``; None when the block is malformed.

    Well-formed means: the text opens with ``<think>`` (leading whitespace allowed), has exactly one
    ``<think>`` and one ``</think>`` in that order, and both the reasoning and the answer after the
    block are non-empty.
    """
    stripped = text.lstrip()
    if not stripped.startswith(THINK_START) or text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return None
    reasoning, _, answer = stripped[len(THINK_START):].partition(THINK_END)
    if not reasoning.strip() or not answer.strip():
        return None
    return reasoning, answer


def think_pattern(tag: str, answer_tag: str, prompt_opens_think: bool) -> re.Pattern:
    """Matches a think block (opened by the prompt when `prompt_opens_think`) that holds no nested
    opening tag, then an answer: inside `<answer_tag>...</answer_tag>` if set, else any non-blank text."""
    opening = "" if prompt_opens_think else rf"\s*<{tag}>"
    answer = rf"\s*<{answer_tag}>.*?</{answer_tag}>\s*" if answer_tag else r"\s*\S.*"
    return re.compile(rf"^{opening}(?:(?!<{tag}>).)*?</{tag}>{answer}$", re.DOTALL)


def reasoning(completion: str, tag: str = "think") -> str:
    """The first think block's text (to the end of the completion if it is never closed), or the
    whole completion when it has no think block."""
    match = re.search(rf"<{tag}>(.*?)(?:</{tag}>|$)", completion, re.DOTALL)
    return match.group(1) if match else completion


# ----------------------------------------------------------------------------------------------
# Scripts: the first word of a letter's Unicode name (LATIN, CJK, HIRAGANA, CYRILLIC, ...)

SCRIPTS = {
    "en": ("LATIN",), "fr": ("LATIN",), "de": ("LATIN",), "es": ("LATIN",), "it": ("LATIN",), "pt": ("LATIN",),
    "zh": ("CJK",), "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": ("HANGUL",), "ru": ("CYRILLIC",),
    "uk": ("CYRILLIC",), "ar": ("ARABIC",), "hi": ("DEVANAGARI",), "el": ("GREEK",), "he": ("HEBREW",),
    "th": ("THAI",),
}
"""The scripts each language of the `language_consistency` reward is written in."""

_WORD = re.compile(r"[^\W\d_]+")  # a maximal run of letters: digits, symbols and LaTeX commands are no words


def _script(char: str) -> str:
    return unicodedata.name(char, "UNKNOWN").split(" ")[0]


def language_share(text: str, language: str) -> float | None:
    """Share of words written in `language`'s script (CJK/kana characters count one word each)."""
    if language not in SCRIPTS:
        raise RewardError(f"reward 'language_consistency': unknown language {language!r}; known: {', '.join(SCRIPTS)}")
    targets = SCRIPTS[language]
    total = hits = 0
    for word in _WORD.findall(text):
        script = _script(word[0])
        count = len(word) if script in ("CJK", "HIRAGANA", "KATAKANA") else 1
        total += count
        hits += count if script in targets else 0
    return hits / total if total else None


# The distillation filter's languages; its zh also accepts kana (the language_consistency reward's zh does not).
_FILTER_SCRIPTS = {"en": SCRIPTS["en"], "zh": SCRIPTS["ja"]}


def foreign_word_share(text: str, language: str) -> float:
    """Share of words written (partly) outside the target language's script.

    A word is a maximal run of letters; it is foreign when one of its letters' Unicode names does
    not start with the script of ``language`` (en: Latin; zh: CJK or kana). Digits, symbols and LaTeX
    commands are not letters of any language and do not count.
    """
    if language not in _FILTER_SCRIPTS:
        raise ValueError(f"language: {language!r} is not supported; choose one of {', '.join(_FILTER_SCRIPTS)}")
    words = _WORD.findall(text)
    if not words:
        return 0.0
    scripts = _FILTER_SCRIPTS[language]

    def is_foreign(word: str) -> bool:
        return any(not unicodedata.name(ch, "").startswith(scripts) for ch in word)

    return sum(is_foreign(word) for word in words) / len(words)
