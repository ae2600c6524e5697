"""The training engine every stage shares: policy, optimizer, schedule, accumulation, checkpoints.

    sections.py   ModelSection (+ LoraSection), TrainSection (+ DeepSpeedSection), training_workload
    policy.py     the policy from a directory, hub id or preset, made trainable (FP8, LoRA, checkpointing)
    optim.py      AdamW, the learning-rate schedule, the DeepSpeed config
    trainer.py    Trainer and lm_loss
    lm.py         train_lm: the next-token loop of the pretrain and sft stages

API (what a stage uses; GRPO reuses all of it with its own loss):

    trainer = Trainer(cfg.model, cfg.train, run_dir, seed=cfg.run.seed, tokenizer=tokenizer)
        # loads the policy (r1pipe.model.policy.load_policy: our V3 or an HF causal LM, LoRA
        # optional), builds AdamW + warmup/cosine|linear|constant schedule (transformers'
        # get_scheduler), wraps in DeepSpeed ZeRO-2/3 when `train.deepspeed` is set.
    extra = trainer.resume()            # None, or the `extra` dict given to save(); restores
                                        # model, optimizer, scheduler, RNG and trainer.step
    while trainer.step < trainer.max_steps:
        micro_batches = ...             # this rank's share of one optimizer step
        metrics = trainer.train_step(micro_batches, loss_fn, weights=None)
            # loss_fn(policy, micro_batch) -> (loss tensor, {name: float|tensor}); each micro
            # batch's loss is scaled by its weight (default 1/len) before backward, so the
            # accumulated gradient is the weighted sum; then clip, optimizer step, scheduler step,
            # policy.after_optimizer_step() (V3 expert-bias update). Returns the weighted metrics
            # averaged over ranks, plus grad_norm and lr. trainer.step is incremented.
        trainer.log(metrics)            # metrics.jsonl + TensorBoard (+ W&B), rank 0 only
        if trainer.should_save(): trainer.save({"data": stream.state_dict()})
    path = trainer.save_final(tokenizer)  # <run>/checkpoints/final, HF format (save_pretrained)

Helpers: `lm_loss` (the pretrain/SFT loss_fn), `Trainer.all_reduce_sum` (e.g. token counts across
ranks, so a global token-weighted mean is exact), `trainer.to_device(batch)`, `trainer.rank/world_size/is_main/device`,
`trainer.autocast()` (bf16 autocast context when `train.precision` is bf16 or fp8, without DeepSpeed),
`trainer.progress(total)` (a tqdm bar on rank 0).
"""
