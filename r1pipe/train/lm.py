"""The next-token training loop of the pretrain and sft stages: token-weighted loss over packed rows,
validation loss on held-out rows, resume from the data position, the final save."""

from __future__ import annotations

from collections.abc import Callable

import torch

from r1pipe.chat import load_tokenizer
from r1pipe.data import BatchStream, collate, split_eval
from r1pipe.train.trainer import Trainer, lm_loss


def evaluate_loss(trainer: Trainer, rows: list[dict], pad_id: int) -> float:
    """Token-weighted mean loss over held-out rows (this rank's share, averaged over ranks)."""
    trainer.policy.module.eval()
    micro = trainer.train_cfg.micro_batch_size
    total, tokens = 0.0, 0
    with torch.no_grad(), trainer.autocast():
        for start in range(trainer.rank * micro, len(rows), micro * trainer.world_size):
            batch = trainer.to_device(collate(rows[start : start + micro], pad_id))
            loss, _ = lm_loss(trainer.policy, batch)
            total += float(loss) * batch["num_loss_tokens"]
            tokens += batch["num_loss_tokens"]
    return trainer.all_reduce_sum(total) / max(trainer.all_reduce_sum(tokens), 1)


def train_lm(cfg, run_dir, build_rows: Callable) -> dict:
    """Pretrain/SFT: rows from `build_rows(data, tokenizer, seed)`, token-weighted loss, resume, final save.

    Each micro batch's loss (a mean over its label tokens) is weighted by its share of the step's
    label tokens over all ranks, so the step's gradient is that of the mean over all its tokens,
    whatever the micro batch size and number of ranks.
    """
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
    rows, stats = build_rows(cfg.data, tokenizer, cfg.run.seed)
    rows, eval_rows = split_eval(rows, cfg.data.eval_rows) if cfg.data.eval_rows else (rows, [])
    trainer = Trainer(cfg.model, cfg.train, run_dir, seed=cfg.run.seed, tokenizer=tokenizer)
    stream = BatchStream(rows, cfg.train.batch_size, cfg.run.seed, trainer.rank, trainer.world_size,
                         tokenizer.pad_token_id, cfg.data.shuffle)
    if trainer.is_main:
        run_dir.logger.info("data: %s", ", ".join(f"{k.removeprefix('data/')}={v:.4g}" for k, v in stats.items()))
    extra = trainer.resume()
    if extra is not None:
        stream.load_state_dict(extra["data"])
        if trainer.is_main:
            run_dir.truncate_metrics_after(trainer.step)
    elif trainer.is_main:
        run_dir.log_metrics(0, stats)
    with trainer.progress(cfg.stage) as bar:
        while trainer.step < trainer.max_steps:
            micro_batches = stream.next_step(cfg.train.micro_batch_size)
            tokens = trainer.all_reduce_sum(sum(b["num_loss_tokens"] for b in micro_batches))
            weights = [b["num_loss_tokens"] / max(tokens, 1) * trainer.world_size for b in micro_batches]
            metrics = trainer.train_step(micro_batches, lm_loss, weights)
            metrics["tokens_per_s"] = tokens / metrics["step_time_s"]
            metrics["epoch"] = stream.epoch
            every = cfg.train.eval_every
            if eval_rows and ((every and trainer.step % every == 0) or trainer.step == trainer.max_steps):
                metrics["eval_loss"] = evaluate_loss(trainer, eval_rows, tokenizer.pad_token_id)
            trainer.log(metrics, force="eval_loss" in metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            bar.update(1)
            if trainer.should_save():
                trainer.save({"data": stream.state_dict()})
    checkpoint = trainer.save_final(tokenizer)
    if trainer.is_main:
        run_dir.plot(["loss", "eval_loss", "grad_norm", "lr", "tokens_per_s"], "training.png")
    return {"checkpoint": checkpoint}
