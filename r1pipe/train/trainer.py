"""The Trainer: one policy + optimizer + schedule, single process or DeepSpeed ZeRO; weighted accumulation,
checkpoints and resume, metrics on rank 0. The API is in r1pipe.train's docstring."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from r1pipe.config import RecipeError, split_evenly
from r1pipe.rundir import capture_rng_state, restore_rng_state
from r1pipe.train.optim import build_optimizer, build_scheduler, deepspeed_config
from r1pipe.train.policy import check_fp8_device, compiles_moe, load_base_policy, load_trainable_policy
from r1pipe.train.sections import ModelSection, TrainSection


def lm_loss(policy, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy on `labels` (-100 = no loss) plus the V3 aux losses, as the policy defines."""
    out = policy.train_loss(batch)
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    return loss, {"loss": loss.detach(), **metrics}


LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict]]


class Trainer:
    """One policy + optimizer + schedule, single process or DeepSpeed; see r1pipe.train's docstring."""

    def __init__(self, model: ModelSection, train: TrainSection, run_dir, seed: int = 0, tokenizer=None):
        self.model_cfg, self.train_cfg, self.run_dir = model, train, run_dir
        self.seed, self.tokenizer = seed, tokenizer
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.step = 0
        self.max_steps = train.max_steps
        self.device = self._pick_device(train.device)
        per_step = train.micro_batch_size * self.world_size
        self.accumulation = split_evenly(
            train.batch_size, per_step,
            f"train.batch_size: {train.batch_size} is not a multiple of micro_batch_size x ranks = {per_step}")
        if self.world_size > 1 and train.deepspeed is None:
            raise RecipeError("train.deepspeed: a multi-process launch needs a deepspeed section (zero_stage: 2|3)")
        if train.precision == "fp8":
            if train.deepspeed is not None:
                raise RecipeError("train.precision: fp8 runs in one process (not verified under DeepSpeed); "
                                  "use bf16 with train.deepspeed")
            check_fp8_device(self.device)
        if train.deepspeed is not None:
            self._require_deepspeed()
        torch.manual_seed(seed)
        self.policy = load_trainable_policy(model, self.device, tokenizer, fp8=train.precision == "fp8")
        zero3 = train.deepspeed is not None and train.deepspeed.zero_stage == 3
        if compiles_moe(model, self.policy, self.device, zero3):
            self.policy.model.compile_moe()  # ZeRO-3's parameter hooks and compiled graphs do not mix
        self.optimizer = build_optimizer(self.policy.module, train)
        self.scheduler = build_scheduler(self.optimizer, train)
        self.engine = self._init_deepspeed() if train.deepspeed is not None else None
        self._last_step_time = time.perf_counter()

    # -- setup ----------------------------------------------------------------------------------

    def _pick_device(self, choice: str) -> torch.device:
        if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise RecipeError("train.device: cuda requested but no CUDA device is visible")
            torch.cuda.set_device(self.local_rank)
            # No cuDNN scaled_dot_product_attention in a training process: with a padding mask torch 2.11 picks
            # it on an H100 and builds an execution plan for every new sequence length, ~3 ms of CPU per call;
            # a GRPO update (a new length per micro batch, and gradient checkpointing's recomputation, which
            # must pick the same kernel as the forward) spent most of its time there (bench/grpo.py, profiled).
            # The memory-efficient kernel takes the same masks.
            torch.backends.cuda.enable_cudnn_sdp(False)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @staticmethod
    def _require_deepspeed() -> None:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RecipeError("train.deepspeed: DeepSpeed is not installed (pip install deepspeed)") from None

    def _init_deepspeed(self):
        import deepspeed

        deepspeed.init_distributed()
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=self.policy.module,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(self.train_cfg, self.world_size),
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.policy.module = engine  # forwards go through the engine; Policy.model unwraps it
        return engine

    @property
    def zero3(self) -> bool:
        return self.engine is not None and self.train_cfg.deepspeed.zero_stage == 3

    def load_reference(self):
        """A frozen copy of the initial policy (GRPO's KL reference), loaded as the policy was: the same
        path resolution and, for a preset, the same initial weights (drawn from the run seed in a forked
        RNG). Under DeepSpeed it runs in an inference engine, as TRL's reference does: ZeRO-3 shards it
        over the ranks like the policy; under ZeRO-2 it is whole on each rank in the policy's dtype."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            reference = load_base_policy(self.model_cfg, self.device, self.tokenizer)
        reference.module.eval().requires_grad_(False)
        if self.engine is not None:
            import deepspeed

            config = deepspeed_config(self.train_cfg, self.world_size)  # the recipe's, user overrides included
            config["zero_optimization"]["stage"] = 3 if self.zero3 else 0
            config["zero_optimization"].pop("offload_optimizer", None)  # no optimizer
            reference.module = deepspeed.initialize(model=reference.module, config=config)[0]
        return reference

    # -- one optimizer step ---------------------------------------------------------------------

    def to_device(self, batch: dict) -> dict:
        """The batch with its tensors on the trainer's device (other values as they are)."""
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def autocast(self):
        """bf16 autocast for single-process bf16 and fp8 runs (DeepSpeed casts the model itself)."""
        if self.train_cfg.precision in ("bf16", "fp8") and self.engine is None:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(
        self, micro_batches: Sequence[dict], loss_fn: LossFn = lm_loss, weights: Sequence[float] | None = None
    ) -> dict:
        """Forward/backward each micro batch with its weight, then one optimizer step; returns metrics."""
        if not micro_batches:
            raise ValueError("train_step needs at least one micro batch")
        weights = list(weights) if weights is not None else [1.0 / len(micro_batches)] * len(micro_batches)
        self.policy.module.train()
        sums: dict[str, float] = {}
        for index, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
            batch = self.to_device(batch)
            if self.engine is not None:  # DeepSpeed reduces gradients and steps at the last micro batch
                self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            with self.autocast():
                loss, metrics = loss_fn(self.policy, batch)
            if self.engine is not None:
                self.engine.backward(loss * weight, scale_wrt_gas=False)
            else:
                (loss * weight).backward()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + weight * float(value)
        grad_norm = self._optimizer_step()
        self.step += 1
        after = self.policy.after_optimizer_step()
        out = {name: self.all_reduce_mean(value) for name, value in sums.items()}
        if isinstance(after, dict):
            out.update({name: float(value) for name, value in after.items()})
        now = time.perf_counter()
        out.update(grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0], step_time_s=now - self._last_step_time)
        self._last_step_time = now
        return out

    def _optimizer_step(self) -> float:
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = [p for p in self.policy.module.parameters() if p.requires_grad]
        max_norm = self.train_cfg.max_grad_norm if self.train_cfg.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- distributed helpers --------------------------------------------------------------------

    def _all_reduce(self, value: float, op) -> float:
        if self.world_size == 1:
            return float(value)
        tensor = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=op)
        return float(tensor)

    def all_reduce_sum(self, value: float) -> float:
        """Sum a number over ranks (identity in a single process)."""
        return self._all_reduce(value, torch.distributed.ReduceOp.SUM)

    def all_reduce_mean(self, value: float) -> float:
        return self.all_reduce_sum(value) / self.world_size

    def all_reduce_max(self, value: float) -> float:
        """Largest value over ranks (identity in a single process)."""
        return self._all_reduce(value, torch.distributed.ReduceOp.MAX)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's equally shaped `tensor`, concatenated along dim 0 in rank order (CPU result)."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor, device=self.device) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.to(self.device))
        return torch.cat(parts).cpu()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # -- logging --------------------------------------------------------------------------------

    def log(self, metrics: dict, force: bool = False) -> None:
        """Write metrics for the current step (every `log_every` steps, rank 0 only)."""
        if self.is_main and (force or self.step % self.train_cfg.log_every == 0 or self.step == self.max_steps):
            self.run_dir.log_metrics(self.step, metrics)

    def progress(self, desc: str = "train"):
        """A progress bar over optimizer steps, starting at the resumed step (silent on other ranks)."""
        return tqdm(total=self.max_steps, initial=self.step, desc=desc, disable=not self.is_main, dynamic_ncols=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def should_save(self) -> bool:
        every = self.train_cfg.save_every
        return every > 0 and self.step % every == 0 and self.step < self.max_steps

    def save(self, extra: dict | None = None, rank_state: Any = None) -> Path:
        """Checkpoint model, optimizer, scheduler, RNG, step and `extra` (e.g. the data position; rank 0's).

        `rank_state` is what differs between ranks (e.g. each rank's share of a GRPO rollout batch): every
        rank writes its own, and `resume` gives each rank back its own under extra["rank_state"].
        """
        state = {"step": self.step, "extra": extra or {}}

        def write(directory: Path) -> None:
            if self.engine is not None:
                self.engine.save_checkpoint(str(directory), tag="deepspeed")
            else:
                state["model"] = self.policy.module.state_dict()
                state["optimizer"] = self.optimizer.state_dict()
                state["scheduler"] = self.scheduler.state_dict()
            torch.save(capture_rng_state(), directory / f"rng_rank{self.rank}.pt")
            if rank_state is not None:
                torch.save(rank_state, directory / f"state_rank{self.rank}.pt")
            if self.is_main:
                torch.save(state, directory / "trainer_state.pt")

        return self._write_checkpoint(write)

    def _write_checkpoint(self, write: Callable[[Path], None]) -> Path:
        if self.world_size == 1:
            return self.run_dir.save_checkpoint(self.step, write, keep_last=self.train_cfg.keep_last)
        # Several ranks write into one directory: rank 0 owns the atomic rename, the others write
        # into the staging directory it announces, between two barriers.
        staging = [None]
        if self.is_main:
            def write_all(directory: Path) -> None:
                staging[0] = str(directory)
                torch.distributed.broadcast_object_list(staging, src=0)
                write(directory)
                torch.distributed.barrier()

            path = self.run_dir.save_checkpoint(self.step, write_all, keep_last=self.train_cfg.keep_last)
        else:
            torch.distributed.broadcast_object_list(staging, src=0)
            write(Path(staging[0]))
            torch.distributed.barrier()
            path = None
        shared = [str(path) if path else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        return Path(shared[0])

    def resume(self) -> dict | None:
        """Load the newest complete checkpoint of the run, if any; returns the `extra` given to save()."""
        directory = self.run_dir.latest_checkpoint()
        if directory is None:
            return None
        state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
        if self.engine is not None:
            self.engine.load_checkpoint(str(directory), tag="deepspeed")
        else:
            self.policy.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        rng_file = directory / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        rank_file = directory / f"state_rank{self.rank}.pt"
        if rank_file.exists():
            state["extra"]["rank_state"] = torch.load(rank_file, map_location="cpu", weights_only=False)
        self.step = state["step"]
        if self.is_main:
            self.run_dir.logger.info("resumed from %s at step %d", directory, self.step)
        return state["extra"]

    def save_final(self, tokenizer=None, name: str = "final") -> Path:
        """Write the trained policy in its loadable format (save_pretrained) to checkpoints/<name>.

        LoRA adapters are merged into the weights; under ZeRO-3 the shards are gathered first.
        """
        from r1pipe.model.policy import Policy

        directory = Path(self.run_dir.path) / "checkpoints" / name
        module = self.engine.module if self.engine is not None else self.policy.module
        gather = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:
            if self.is_main:
                directory.mkdir(parents=True, exist_ok=True)
                final = module.merge_and_unload() if self.model_cfg.lora is not None else module
                if self.model_cfg.lora is not None and self.train_cfg.precision == "fp8":
                    from r1pipe.kernels import refresh_fp8_weights

                    refresh_fp8_weights(final)  # the merge wrote the weights through .data
                Policy(final).save_pretrained(directory)
                if tokenizer is not None:
                    tokenizer.save_pretrained(directory)
        self.barrier()
        return directory
