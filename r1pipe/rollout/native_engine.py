"""Rollouts with our own KV-cache decoding (``r1pipe.model.generate``) on the trainer's live weights.

No second copy of the model and no weight push: generation reads the policy being trained. It needs
nothing beyond torch; HF Llama/Qwen policies decode through ``r1pipe.model.fast_decode`` (static KV
cache, CUDA graphs), and V3 policies can draft with the MTP module (speculative decoding). A recipe
selects it explicitly with ``rollout.engine: native``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from r1pipe.model.fast_decode import DecodeWorkspace
from r1pipe.rollout.base import Completion, SamplingSettings


class NativeEngine:
    """`dtype` (rollout.dtype): on CUDA, decoding runs under autocast to it when the weights are wider
    (fp32 master weights decode in bf16, as vLLM would); on CPU the weights' own dtype is used."""

    def __init__(self, policy, *, mtp_speculative: bool = False, pad_token_id: int = 0, record_routes: bool = False,
                 dtype: str = "auto", release_cache: bool = False):
        self.policy, self.mtp_speculative, self.pad_token_id = policy, mtp_speculative, pad_token_id
        self.record_routes = record_routes  # R3 routing replay: each completion carries its experts
        self.dtype, self.release_cache = dtype, release_cache
        self.last_acceptance_rate: float | None = None
        # the fast path's static KV cache and CUDA graphs, kept between rollouts (same shapes every step)
        self.workspace = DecodeWorkspace()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings, seed: int) -> list[Completion]:
        from r1pipe.model.generate import generate

        if sampling.top_k > 0:
            raise ValueError("grpo.top_k: the native engine samples with temperature and top_p only; set top_k: -1")
        repeated = [ids for ids in prompt_ids for _ in range(sampling.n)]
        with torch.no_grad(), self._whole_weights(), self._autocast():
            result = generate(
                self.policy.model,
                repeated,
                max_new_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                eos_token_id=list(sampling.stop_token_ids),
                seed=seed,
                use_mtp=self.mtp_speculative,
                pad_token_id=self.pad_token_id,
                record_routes=self.record_routes,
                workspace=self.workspace,
            )
        self.last_acceptance_rate = result.acceptance_rate
        routes = result.routes or [None] * len(repeated)
        return [
            Completion(row // sampling.n, tokens, logprobs, truncated, route)
            for row, (tokens, logprobs, truncated, route) in enumerate(
                zip(result.token_ids, result.logprobs, result.truncated, routes, strict=True)
            )
        ]

    def _autocast(self):
        param = next(self.policy.model.parameters())
        if param.device.type != "cuda" or self.dtype not in ("bfloat16", "float16"):
            return contextlib.nullcontext()
        dtype = getattr(torch, self.dtype)
        return torch.autocast("cuda", dtype=dtype) if param.dtype.itemsize > dtype.itemsize else contextlib.nullcontext()

    def _whole_weights(self):
        """Under DeepSpeed ZeRO-3 each rank holds a shard of every weight, gathered per module in a forward.
        Decoding runs one forward per token, and ranks stop after different numbers of tokens, so per-module
        gathers would not match up between ranks: gather the whole model once for the call instead
        (DeepSpeed's `unwrap_model_for_generation`, what TRL does). Every rank must call generate."""
        engine = self.policy.module
        partitioned = getattr(engine, "zero_optimization_partition_weights", None)
        if partitioned is None or not partitioned():
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import unwrap_model_for_generation

        return unwrap_model_for_generation(engine)

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Nothing to copy: the engine decodes with the policy's own parameters."""
        return 0.0

    def sleep(self) -> None:
        """With `release_cache` (rollout.sleep_during_training): free the static KV cache and its CUDA graphs
        while the trainer runs; the next rollout allocates and captures them again."""
        if self.release_cache:
            self.workspace.release()

    def close(self) -> None:
        """Frees the fast path's KV cache and graphs."""
        self.workspace.release()
