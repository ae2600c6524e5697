"""Two ranks on the CPU (torchrun + DeepSpeed over gloo) give the one-process run's gradients.

Every scenario of tests/multirank_worker.py runs once in one process without DeepSpeed (the reference)
and once as 2 ranks under DeepSpeed ZeRO-2 or ZeRO-3, on the same global batch. The first optimizer
step's full gradients must agree to fp32 round-off (relative Frobenius error 1e-5; measured ~1e-7),
the second step's too after one AdamW step on both sides (1e-4; measured ~1e-6).
"""
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("multirank_worker.py")
SAME_GRADIENTS = ["grpo-grpo", "grpo-bnpo", "grpo-dapo", "grpo-dr_grpo", "grpo-batch-std-kl", "grpo-zero3",
                  "grpo-zero3-kl", "grpo-v3", "sft-qwen", "sft-v3-zero3", "grpo-mu2-whole", "grpo-minibatch-rpp",
                  "grpo-gspo-zero3"]
SCENARIOS = SAME_GRADIENTS + ["grpo-dynamic", "grpo-mu2-killed", "grpo-zero3-native-v3", "sft-zero3-whole",
                               "sft-zero3-killed"]
VLLM = importlib.util.find_spec("vllm") is not None
TOLERANCE = {1: 1e-5, 2: 1e-4}  # relative Frobenius error of the full gradient, by optimizer step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, ranks: int, scenarios: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if ranks == 1:
        command = [sys.executable, str(WORKER)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER)]
    proc = subprocess.run(command + [str(out), *scenarios], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{ranks} rank(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multirank")
    launch(out, 1, SCENARIOS)
    launch(out, 2, SCENARIOS)
    return out


def result(runs: Path, name: str, world: int, rank: int = 0) -> dict:
    return torch.load(runs / name / f"world{world}-rank{rank}.pt", weights_only=False)


def relative_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
    norm = sum(float((a[k] ** 2).sum()) for k in a)
    return (diff / norm) ** 0.5


@pytest.mark.parametrize("name", SAME_GRADIENTS)
def test_two_ranks_give_the_one_rank_gradients(runs, name):
    one, two = result(runs, name, 1), result(runs, name, 2)
    assert sorted(one["grads"]) == sorted(two["grads"]) == [1, 2]
    for step, tolerance in TOLERANCE.items():
        error = relative_error(one["grads"][step], two["grads"][step])
        assert error < tolerance, f"{name}: step {step} gradients differ by {error:.2e} (relative)"
    first = [m for m in one["metrics"] if m["step"] == 1][0]
    second = [m for m in two["metrics"] if m["step"] == 1][0]
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-4, abs=1e-7)
    assert second["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)


def test_zero3_shards_the_kl_reference(runs):
    """beta > 0 under ZeRO-3: the reference model is partitioned over the ranks like the policy."""
    whole = result(runs, "grpo-zero3-kl", 1)["reference_numel"]
    shards = [result(runs, "grpo-zero3-kl", 2, rank)["reference_numel"] for rank in (0, 1)]
    assert whole[0] > 0 and shards == [[0], [0]]  # every parameter partitioned: none held whole by a rank
    assert result(runs, "grpo-batch-std-kl", 2)["reference_numel"] == whole  # ZeRO-2: whole on each rank


def test_dynamic_sampling_keeps_the_ranks_in_step(runs):
    """Ranks keep different numbers of groups per round, yet they make the same generate calls and their
    prompt samplers stay at the same position (rank 0's checkpointed position is every rank's)."""
    ranks = [result(runs, "grpo-dynamic", 2, rank) for rank in (0, 1)]
    assert ranks[0]["calls"] == ranks[1]["calls"]
    assert ranks[0]["sampler"] == ranks[1]["sampler"]
    assert max(len(calls) for calls in ranks[0]["calls"]) > 2  # refill rounds did happen


def test_resume_in_the_middle_of_a_rollout_batch(runs):
    """mu = 2, killed at the 4th update: the checkpoint of step 3 holds each rank's own half-used rollout
    batch; the resumed run ends exactly as the uninterrupted one."""
    whole, killed = result(runs, "grpo-mu2-whole", 2), result(runs, "grpo-mu2-killed", 2)
    keys = ("loss", "reward/mean", "kl", "clip_fraction", "grad_norm", "entropy", "is_weight_mean")

    def steady(metrics):
        return [{k: m[k] for k in keys if k in m} for m in metrics if m["step"] > 0]

    assert len(steady(whole["metrics"])) == 4
    for a, b in zip(steady(whole["metrics"]), steady(killed["metrics"]), strict=True):
        assert b.keys() == a.keys() and b == pytest.approx(a, rel=1e-5, abs=1e-8)
    assert killed["calls"] == [[]]  # the resumed run generated nothing: step 4 used the restored batch


@pytest.mark.parametrize("world", [1, 2])
def test_sft_resumes_after_a_kill_as_if_never_stopped(runs, world):
    """SFT (ZeRO-3 on 2 ranks), killed at its 3rd step and rerun: it resumes from the checkpoint of step 2
    (sharded model and optimizer states, each rank's data position) and ends as the uninterrupted run."""
    whole, killed = result(runs, "sft-zero3-whole", world), result(runs, "sft-zero3-killed", world)
    keys = ("loss", "grad_norm", "lr")

    def steady(metrics):
        return [{k: m[k] for k in keys if k in m} for m in metrics if "loss" in m and m.get("step", 0) > 0]

    assert len(steady(whole["metrics"])) == 4
    for a, b in zip(steady(whole["metrics"]), steady(killed["metrics"]), strict=True):
        assert b.keys() == a.keys() and b == pytest.approx(a, rel=1e-5, abs=1e-8)
    # and the 2-rank curves are the 1-rank ones (same global batch)
    one_rank = steady(result(runs, "sft-zero3-whole", 1)["metrics"])
    for a, b in zip(one_rank, steady(whole["metrics"]), strict=True):
        assert b == pytest.approx(a, rel=1e-5)


def test_tensor_parallel_vllm_gets_the_groups_prompts_and_one_seed(tmp_path):
    """rollout.tensor_parallel_size 2 on 2 ranks: one engine, so both shards must be handed the same
    requests (both ranks' prompts, in rank order) with one seed; each rank gets its own completions back.
    Its own launch: importing vLLM after the training scenarios in the same processes aborted a rank at exit
    once in ~13 runs ("terminate called without an active exception"), which took every scenario's results
    with it; alone it passed 15 of 15."""
    if not VLLM:
        pytest.skip("vllm is not installed (the engine's sampling parameters)")
    launch(tmp_path, 2, ["vllm-tensor-parallel"])
    ranks = [result(tmp_path, "vllm-tensor-parallel", 2, rank) for rank in (0, 1)]
    assert ranks[0]["seen"] == ranks[1]["seen"] and len(ranks[0]["seen"]) == 1
    assert ranks[0]["seen"][0]["prompts"] == ranks[0]["prompts"] + ranks[1]["prompts"]
    assert ranks[0]["seen"][0]["seed"] == 1000  # the group's first rank's seed
    for rank in ranks:
        expected = [(i, [prompt[0], k], [-1.0, -2.0]) for i, prompt in enumerate(rank["prompts"]) for k in range(2)]
        assert rank["completions"] == expected


def test_native_rollouts_on_zero3_weights(runs):
    """Real sampling with the native engine on a ZeRO-3 V3 policy. Ranks may stop decoding after different
    numbers of tokens, so the weights are gathered once per generate call rather than per module and
    token (unmatched collectives would hang)."""
    metrics = [m for m in result(runs, "grpo-zero3-native-v3", 2)["metrics"] if m["step"] > 0]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["completion_length/mean"] > 0 and m["mtp_loss"] > 0 for m in metrics)
    assert result(runs, "grpo-zero3-native-v3", 2, 1)["reference_numel"] == [0]
