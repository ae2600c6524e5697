"""Shared fixtures of the model tests (this file holds no tests)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run fastest on one thread; on a shared 2-core box two OpenMP threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_v3_scaled(seed: int = 0):
    """tiny-v3 with fan-in scaled weights: logits spread enough that greedy tokens and FP8 errors are meaningful."""
    from r1pipe.model import DeepseekConfig, DeepseekForCausalLM

    torch.manual_seed(seed)
    model = DeepseekForCausalLM(DeepseekConfig.preset("tiny-v3"))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 1 / p.shape[-1] ** 0.5)
    return model
