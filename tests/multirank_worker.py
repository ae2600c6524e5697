"""Scenarios of tests/test_multirank.py, run either in one process or as each rank of a `torchrun` launch.

    torchrun --nproc_per_node 2 tests/multirank_worker.py OUT_DIR SCENARIO [SCENARIO ...]

Each scenario runs a real stage (r1pipe.runner.run_stage) on a tiny model and writes what the test
compares to OUT_DIR/<scenario>/world<W>-rank<r>.pt: the full gradients of the first optimizer steps (gathered
from DeepSpeed's partitions with `deepspeed.utils.safe_get_full_grad`, before the optimizer step),
the logged metrics, the rollout engine's calls and the prompt sampler's position. GRPO rollouts come
from `ScriptedEngine`, whose completions depend only on the prompt and the sample index (never on the
rank, the seed or the batch), so a 2-rank run sees exactly the global batch of the 1-rank run.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import yaml

from r1pipe.rewards import reward

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "recipes" / "demo" / "tokenizer"
DEMO_DATA = REPO / "recipes" / "demo" / "data"
GRAD_STEPS = 2  # optimizer steps whose gradients are recorded


# ----------------------------------------------------------------------------------------------
# Deterministic rollouts and a reward with spread


class ScriptedEngine:
    """A rollout engine whose completions are a fixed function of (prompt ids, sample index).

    Prompts whose ids sum to a multiple of 3 get G identical completions (a group without signal, for
    dynamic sampling). Records every generate call, so the test can check the ranks made the same ones.
    """

    last_acceptance_rate = None

    def __init__(self, vocab_size: int):
        self.vocab_size, self.calls = vocab_size, []

    def generate(self, prompt_ids, sampling, seed):
        from r1pipe.rollout import Completion

        self.calls.append(len(prompt_ids))
        out = []
        for index, prompt in enumerate(prompt_ids):
            key = sum(prompt)
            for k in range(sampling.n):
                sample = 0 if key % 3 == 0 else k
                length = 1 + (key * 7 + sample * 5) % sampling.max_tokens
                tokens = [3 + (key * 13 + sample * 29 + t * 11) % (self.vocab_size - 3) for t in range(length)]
                logprobs = [-0.5 - 0.1 * ((t + sample) % 4) for t in range(length)]
                out.append(Completion(index, tokens, logprobs, length == sampling.max_tokens))
        return out

    def push_weights(self, named_tensors):
        for _ in named_tensors:  # the ZeRO-3 gather is collective: every rank walks the weights
            pass
        return 0.0

    def sleep(self):
        pass

    def close(self):
        pass


@reward("multirank_even_tokens")
def multirank_even_tokens(prompt, completion, *, completion_ids=None):
    """Share of the completion's tokens with an even id: spread within most groups."""
    return sum(i % 2 == 0 for i in completion_ids) / len(completion_ids) if completion_ids else 0.0


ENGINES: list[ScriptedEngine] = []
SAMPLER_POSITIONS: list[int] = []
REFERENCE_NUMEL: list[int] = []
REAL_ENGINE: list[bool] = []  # non-empty: the scenario samples with r1pipe's native engine


def install_hooks(record_grads: dict) -> None:
    """Scripted engine, gradient capture, sampler positions and the reference's size, patched into r1pipe."""
    import r1pipe.rollout
    from r1pipe.stages import grpo as stage
    from r1pipe.train import trainer as train

    real_engine = r1pipe.rollout.build_engine

    def build_engine(section, *, model_dir, policy, max_model_len, seed, record_routes=False):
        if section.engine != "native" or record_routes:
            raise AssertionError("the multi-rank scenarios script the native engine, without routing replay")
        if REAL_ENGINE:
            return real_engine(section, model_dir=model_dir, policy=policy, max_model_len=max_model_len, seed=seed)
        engine = ScriptedEngine(policy.model.config.vocab_size)
        ENGINES.append(engine)
        return engine

    r1pipe.rollout.build_engine = build_engine
    load_reference = train.Trainer.load_reference

    def measured_reference(self):
        reference = load_reference(self)
        REFERENCE_NUMEL.append(sum(p.numel() for p in reference.model.parameters()))
        return reference

    train.Trainer.load_reference = measured_reference
    step = train.Trainer._optimizer_step

    def capture(self):
        if self.step < GRAD_STEPS:
            named = [(n, p) for n, p in self.policy.model.named_parameters() if p.requires_grad]
            if self.engine is not None:
                from deepspeed.utils import safe_get_full_grad

                grads = {n: safe_get_full_grad(p) for n, p in named}  # collective under ZeRO-3
            else:
                grads = {n: p.grad for n, p in named}
            record_grads[self.step + 1] = {n: g.detach().float().cpu().clone() for n, g in grads.items()
                                           if g is not None}
        return step(self)

    train.Trainer._optimizer_step = capture
    generate_batch = stage.GrpoRun.generate_batch

    def positions(self):
        batch = generate_batch(self)
        SAMPLER_POSITIONS.append(self.sampler.consumed)
        return batch

    stage.GrpoRun.generate_batch = positions


# ----------------------------------------------------------------------------------------------
# Recipes


def tiny_qwen(directory: Path) -> Path:
    from transformers import AutoTokenizer

    from r1pipe.demo.build import tiny_qwen2

    return tiny_qwen2(directory, len(AutoTokenizer.from_pretrained(TOKENIZER)))


def grpo_recipe(out: Path, name: str, model: str, deepspeed: dict | None, **grpo) -> dict:
    prompts = out / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": f"say {i} {'7' * (i % 5)}"}) + "\n" for i in range(48)))
    return {
        "stage": "grpo",
        "run": {"name": name, "output_dir": str(out / "runs"), "seed": 0, "report_to": []},
        "model": {"path": model, "tokenizer": str(TOKENIZER)},
        "data": {"sources": [{"path": str(prompts)}], "reward_columns": []},
        "train": {"max_steps": 2, "batch_size": 16, "micro_batch_size": 4, "lr": 1e-2, "scheduler": "constant",
                  "max_grad_norm": 0.0, "deepspeed": deepspeed},
        "grpo": {"group_size": 4, "max_completion_length": 6, "max_prompt_length": 32, "log_samples": 0, **grpo},
        "rollout": {"engine": "native"},
        "rewards": [{"name": "multirank_even_tokens"}],
    }


def sft_recipe(out: Path, name: str, model: str, deepspeed: dict | None) -> dict:
    return {
        "stage": "sft",
        "run": {"name": name, "output_dir": str(out / "runs"), "seed": 0, "report_to": []},
        "model": {"path": model, "tokenizer": str(TOKENIZER)},
        "data": {"sources": [{"path": str(DEMO_DATA / "cold_start.jsonl"), "max_rows": 64}], "max_length": 128,
                 "packing": False},
        "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "scheduler": "constant",
                  "max_grad_norm": 0.0, "deepspeed": deepspeed},
    }


def scenarios(out: Path, world: int) -> dict:
    """name -> recipe. One process runs without DeepSpeed (the reference run of each scenario)."""
    qwen = str(tiny_qwen(out / "tiny-qwen2"))
    # ZeRO-3 keeps parameters under 1e5 elements whole on every rank by default: shard all of the tiny models'
    sharded = out / "zero3.json"
    sharded.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    ZERO2, ZERO3 = {"zero_stage": 2}, {"zero_stage": 3, "config": str(sharded)}

    def ds(stage):
        return stage if world > 1 else None

    table = {f"grpo-{loss}": grpo_recipe(out, f"grpo-{loss}", qwen, ds(ZERO2), loss_type=loss)
             for loss in ("grpo", "bnpo", "dapo", "dr_grpo")}
    table["grpo-batch-std-kl"] = grpo_recipe(out, "grpo-batch-std-kl", qwen, ds(ZERO2), loss_type="grpo",
                                             scale_rewards="batch", beta=0.1)
    table["grpo-zero3"] = grpo_recipe(out, "grpo-zero3", qwen, ds(ZERO3), loss_type="dapo")
    table["sft-qwen-zero3"] = sft_recipe(out, "sft-qwen-zero3", qwen, ds(ZERO3))
    table["grpo-zero3-kl"] = grpo_recipe(out, "grpo-zero3-kl", qwen, ds(ZERO3), loss_type="dapo", beta=0.1)
    table["grpo-v3"] = grpo_recipe(out, "grpo-v3", "nano-v3", ds(ZERO2), loss_type="dapo")  # MTP + balance losses
    table["sft-qwen"] = sft_recipe(out, "sft-qwen", qwen, ds(ZERO2))
    table["sft-v3-zero3"] = sft_recipe(out, "sft-v3-zero3", "nano-v3", ds(ZERO3))
    table["grpo-dynamic"] = grpo_recipe(out, "grpo-dynamic", qwen, ds(ZERO2), dynamic_sampling=True,
                                        max_sampling_rounds=3)
    # the objective family: PPO mini-batches with whole-step REINFORCE++ whitening and a KL in the reward
    # (ZeRO-2); GSPO-token with RLOO, the entropy bonus and a k2 KL loss (ZeRO-3)
    table["grpo-minibatch-rpp"] = grpo_recipe(out, "grpo-minibatch-rpp", qwen, ds(ZERO2), mini_batches=2,
                                              advantage="reinforce_pp_baseline", beta=0.1, kl_in_reward=True,
                                              kl_estimator="k1", clip_ratio_c=3.0)
    table["grpo-gspo-zero3"] = grpo_recipe(out, "grpo-gspo-zero3", qwen, ds(ZERO3), advantage="rloo",
                                           importance_sampling_level="sequence_token", entropy_coef=0.01,
                                           beta=0.1, kl_estimator="k2")
    # real sampling on ZeRO-3 weights (one gather per generate call)
    table["grpo-zero3-native-v3"] = grpo_recipe(out, "grpo-zero3-native-v3", "nano-v3", ds(ZERO3), beta=0.1,
                                                max_completion_length=8)
    resume = dict(loss_type="grpo", mu=2, beta=0.1)
    for name in ("grpo-mu2-whole", "grpo-mu2-killed"):
        table[name] = grpo_recipe(out, name, qwen, ds(ZERO2), **resume)
        table[name]["train"].update(max_steps=4, save_every=1)
    for name in ("sft-zero3-whole", "sft-zero3-killed"):  # ZeRO-3 checkpoints: sharded states, per-rank data
        table[name] = sft_recipe(out, name, qwen, ds(ZERO3))
        table[name]["train"].update(max_steps=4, save_every=1)
    return table


# ----------------------------------------------------------------------------------------------
# Running


def tensor_parallel_engine() -> dict:
    """A colocated vLLM engine of tensor-parallel size = world size, its `LLM` replaced by a recorder:
    each rank asks for its own prompts with its own seed. -> what the LLM saw and what this rank got."""
    from types import SimpleNamespace

    from r1pipe.rollout import SamplingSettings
    from r1pipe.rollout.vllm_engine import VLLMColocatedEngine, tensor_parallel_group

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not torch.distributed.is_initialized():  # alone in this launch: no trainer made the process group
        torch.distributed.init_process_group("gloo")
    seen = []

    class RecordingLLM:
        def generate(self, prompts, params, use_tqdm=False):
            seen.append({"prompts": [list(p["prompt_token_ids"]) for p in prompts], "seed": torch.initial_seed()})
            sample = lambda ids, k: SimpleNamespace(token_ids=[ids[0], k], logprobs=[{ids[0]: SimpleNamespace(logprob=-1.0)},
                                                    {k: SimpleNamespace(logprob=-2.0)}], finish_reason="stop")
            return [SimpleNamespace(outputs=[sample(p["prompt_token_ids"], k) for k in range(params.n)]) for p in prompts]

    engine = VLLMColocatedEngine.__new__(VLLMColocatedEngine)
    engine.llm, engine.on_gpu, engine.asleep, engine.trainer_threads = RecordingLLM(), False, False, 1
    engine.tp_group = tensor_parallel_group(world)
    mine = [[100 * rank + i, 7] for i in range(rank + 1)]  # ranks bring different numbers of prompts
    completions = engine.generate(mine, SamplingSettings(n=2, max_tokens=4), seed=1000 + rank)
    return {"seen": seen, "prompts": mine,
            "completions": [(c.prompt_index, c.token_ids, c.logprobs) for c in completions]}


def run_killed(recipe: Path, owner, method: str, at_call: int) -> None:
    """Run the recipe until `owner.method` is called for the `at_call`-th time, then raise KeyboardInterrupt
    there on every rank."""
    from r1pipe.runner import load_recipe, run_stage

    original, calls = getattr(owner, method), {"n": 0}

    def dies(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    setattr(owner, method, dies)
    try:
        run_stage(load_recipe(recipe))
        raise AssertionError("the killed run was not killed")
    except KeyboardInterrupt:
        pass
    finally:
        setattr(owner, method, original)


def run(out: Path, names: list[str]) -> None:
    from r1pipe.runner import load_recipe, run_stage

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    grads: dict = {}
    install_hooks(grads)
    table = scenarios(out, world)
    for name in names:
        if name == "vllm-tensor-parallel":
            target = out / name
            target.mkdir(exist_ok=True)
            torch.save(tensor_parallel_engine(), target / f"world{world}-rank{rank}.pt")
            continue
        grads.clear()
        for record in (ENGINES, SAMPLER_POSITIONS, REFERENCE_NUMEL, REAL_ENGINE):
            record.clear()
        if "native" in name:
            REAL_ENGINE.append(True)
        recipe = out / f"{name}-{world}.yaml"
        body = json.loads(json.dumps(table[name]))
        body["run"]["name"] = f"{name}-{world}"
        recipe.write_text(yaml.safe_dump(body))
        if name == "grpo-mu2-killed":
            from r1pipe.stages.grpo import GrpoRun

            run_killed(recipe, GrpoRun, "update", at_call=4)  # checkpoint 3 holds the second rollout batch, half used
            ENGINES.clear()
        if name == "sft-zero3-killed":
            from r1pipe.train.trainer import Trainer

            run_killed(recipe, Trainer, "train_step", at_call=3)  # resumes from the checkpoint of step 2
        run_stage(load_recipe(recipe))
        run_dir = out / "runs" / f"{name}-{world}"
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
        result = {"grads": dict(grads), "metrics": metrics, "calls": [e.calls for e in ENGINES],
                  "sampler": list(SAMPLER_POSITIONS), "reference_numel": list(REFERENCE_NUMEL)}
        target = out / name
        target.mkdir(exist_ok=True)
        torch.save(result, target / f"world{world}-rank{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]), sys.argv[2:])
