"""Generation by a model that does not train (distillation's teacher, the model under evaluation): which
model the engine serves and how it samples; `r1pipe.rollout.build_frozen_engine` starts the engine."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from r1pipe.config import Section
from r1pipe.rollout import SamplingSettings, stop_token_ids


class TeacherSection(Section):
    """The model that writes the reasoning."""

    path: str = Field(description="Teacher model directory (HF format or an r1pipe checkpoint/export).")
    tokenizer: str | None = Field(None, description="Tokenizer directory; default: the teacher directory.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights dtype of the native engine (vLLM uses rollout.dtype)."
    )


class SamplingSection(Section):
    """How the teacher samples (R1's evaluation settings by default)."""

    n: int = Field(4, gt=0, description="Completions sampled per prompt (k).")
    temperature: float = Field(0.6, ge=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold.")
    max_tokens: int = Field(1024, gt=0, description="Completion token limit.")
    prompts_per_chunk: int = Field(
        64, gt=0, description="Prompts generated, scored and written together; the unit of resumption."
    )

    def settings(self, tokenizer) -> SamplingSettings:
        """The rollout engine's sampling settings; completions stop at the tokenizer's end-of-turn tokens."""
        return SamplingSettings(n=self.n, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                stop_token_ids=tuple(sorted(stop_token_ids(tokenizer))))
