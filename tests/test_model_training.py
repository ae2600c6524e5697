"""Training: float64 finite-difference gradients, gradient checkpointing, a short run on real text that
lowers the LM and MTP losses, the expert-bias hook."""
import json

import pytest
import torch

from r1pipe.model import DeepseekConfig, DeepseekForCausalLM
from test_model_helpers import single_thread  # noqa: F401  (autouse fixture)


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig.preset("nano-v3").replace(aux_loss_alpha=0.01)).double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def loss():
        return model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    loss().backward()
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.kv_b_proj.weight",
             "model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
             "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj",
             "model.layers.2.mlp.gate.weight", "model.layers.3.eh_proj.weight", "model.layers.3.mlp.gate.weight",
             "model.layers.1.mlp.shared_experts.up_proj.weight", "model.norm.weight", "lm_head.weight"]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    for name in names:
        p = params[name]
        for flat in torch.randint(0, p.numel(), (3,), generator=g).tolist():
            idx = torch.unravel_index(torch.tensor(flat), p.shape)
            with torch.no_grad():
                p[idx] += 1e-6
                up = loss()
                p[idx] -= 2e-6
                down = loss()
                p[idx] += 1e-6
            numeric = (up - down) / 2e-6
            assert abs(numeric - p.grad[idx]) <= 1e-6 + 1e-4 * abs(numeric), (name, numeric.item(), p.grad[idx].item())


def test_gradient_checkpointing_same_grads_and_loads():
    torch.manual_seed(0)
    config = DeepseekConfig.preset("nano-v3")
    ids = torch.randint(0, 512, (2, 16))
    grads, loads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = DeepseekForCausalLM(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[1].self_attn.kv_b_proj.weight.grad)
        loads.append(model.moe_layers()[1].expert_load.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.equal(loads[0], loads[1]) and loads[0].sum() == 32 * config.num_experts_per_tok


def packed_gsm8k(shared_data, rows: int, seq_len: int):
    """GSM8K question+answer texts as UTF-8 bytes (ids 3..258), packed into rows of seq_len with
    position_ids restarting at every document."""
    ids, pos = [], []
    with open(shared_data / "gsm8k_train.jsonl") as f:
        for line in f:
            row = json.loads(line)
            doc = [1] + [b + 3 for b in (row["question"] + "\n" + row["answer"]).encode()] + [2]
            ids += doc
            pos += list(range(len(doc)))
            if len(ids) >= rows * seq_len:
                break
    n = rows * seq_len
    return torch.tensor(ids[:n]).view(rows, seq_len), torch.tensor(pos[:n]).view(rows, seq_len)


def test_short_training_on_real_text_lowers_lm_and_mtp_loss(shared_data):
    ids, pos = packed_gsm8k(shared_data, rows=64, seq_len=64)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig.preset("nano-v3")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(120):
        rows = torch.arange(8) + (step * 8) % 64
        out = model(ids[rows], position_ids=pos[rows], labels=ids[rows])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        metrics = model.update_expert_bias()
        history.append(out.aux)
    first = {k: sum(h[k] for h in history[:8]) / 8 for k in ("lm_loss", "mtp_loss")}
    last = {k: sum(h[k] for h in history[-8:]) / 8 for k in ("lm_loss", "mtp_loss")}
    assert last["lm_loss"] < first["lm_loss"] - 2.0, (first, last)
    assert last["mtp_loss"] < first["mtp_loss"] - 1.5, (first, last)
    assert "expert_load_max_over_mean" in metrics and "balance_loss" in history[-1]
    bias = model.moe_layers()[1].gate.e_score_correction_bias
    assert bias.abs().max() > 0  # the bias update ran


def test_hidden_state_forward_with_labels_returns_only_the_auxiliary_loss():
    """What GRPO adds to its own token loss for a V3 policy: MTP weight x MTP loss + balance loss."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig.preset("nano-v3").replace(aux_loss_alpha=0.01)).train()
    ids = torch.randint(0, 512, (2, 16))
    full = model(ids, labels=ids)
    aux = model(ids, labels=ids, return_hidden=True)
    torch.testing.assert_close(aux.loss, full.loss - full.aux["lm_loss"], rtol=1e-5, atol=1e-5)
    assert aux.logits is None and aux.hidden_states is not None
    assert "lm_loss" not in aux.aux and aux.aux["mtp_loss"] > 0 and aux.aux["balance_loss"] > 0


def test_compiled_moe_layers_match_eager():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig.preset("nano-v3")).train()
    ids = torch.randint(0, 512, (2, 16))
    eager = model(ids, labels=ids).loss
    moe = next(iter(model.moe_layers().values()))
    eager_load = moe.expert_load.clone()
    moe.expert_load.zero_()
    model.compile_moe()
    compiled = model(ids, labels=ids).loss
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert eager_load.sum() > 0 and torch.equal(moe.expert_load, eager_load)  # the bias update sees the same loads
    compiled.backward()
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad is not None
    assert "model.layers.1.mlp.experts.gate_up_proj" in model.state_dict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_compiles_v3_moe_on_cuda_and_tracks_eager():
    """The trainer's default on CUDA (model.compile_moe) trains like the eager layers."""
    from r1pipe.train.sections import ModelSection, TrainSection
    from r1pipe.train.trainer import Trainer

    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"input_ids": ids, "labels": ids}
    losses = {}
    for compile_moe in (False, True):
        trainer = Trainer(ModelSection(path="nano-v3", compile_moe=compile_moe),
                          TrainSection(max_steps=30, batch_size=8, micro_batch_size=8, lr=3e-3, device="cuda"),
                          run_dir=None, seed=0)
        moe = next(iter(trainer.policy.model.moe_layers().values()))
        assert (moe._compiled_call_impl is not None) == compile_moe
        for _ in range(30):
            metrics = trainer.train_step([batch])
        losses[compile_moe] = float(metrics["loss"])
        assert moe.gate.e_score_correction_bias.abs().max() > 0  # the bias update ran
    assert losses[True] < 5.0 and abs(losses[True] - losses[False]) <= 0.05 * losses[False], losses
