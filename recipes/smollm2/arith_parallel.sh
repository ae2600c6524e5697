#!/usr/bin/env bash
# The steps of recipes/smollm2/arith-pipeline.yaml with the three GRPO seeds (and the evals) running
# side by side on one GPU: a 135M model leaves an H100 mostly idle (decoding is launch-bound), so
# three processes take little longer than one. Same run directories and configs as the pipeline,
# whose final call only writes the report (every other step is complete and skipped).
#   bash recipes/smollm2/arith_parallel.sh            # from the repository root
#   SEEDS="0 1" bash recipes/smollm2/arith_parallel.sh
set -euo pipefail
P=runs/smollm2-arith
SEEDS=${SEEDS:-"0 1 2"}
M=$P/export/model
mkdir -p $P/logs
t0=$(date +%s)
stamp() { echo "[arith_parallel] $(( $(date +%s) - t0 ))s: $*"; }

r1pipe export recipes/smollm2/export.yaml run.output_dir=$P run.name=export export.verify.vllm=false \
  > $P/logs/export.log 2>&1
stamp "export done"
pids=()
r1pipe eval recipes/smollm2/arith-eval.yaml run.output_dir=$P run.name=eval_base model.path=$M \
  > $P/logs/eval_base.log 2>&1 & pids+=($!)
for s in $SEEDS; do
  r1pipe grpo recipes/smollm2/arith-grpo.yaml run.output_dir=$P run.name=rl_s$s run.seed=$s model.path=$M \
    > $P/logs/rl_s$s.log 2>&1 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
stamp "base eval and GRPO seeds ($SEEDS) done"
pids=()
for s in $SEEDS; do
  r1pipe eval recipes/smollm2/arith-eval.yaml run.output_dir=$P run.name=eval_rl_s$s \
    model.path=$P/rl_s$s/checkpoints/final > $P/logs/eval_rl_s$s.log 2>&1 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
stamp "evals done"
if [ "$SEEDS" = "0 1 2" ]; then
  r1pipe run recipes/smollm2/arith-pipeline.yaml > $P/logs/pipeline.log 2>&1   # only the report is left
fi
python recipes/smollm2/arith_stats.py $P | tee $P/stats.md
stamp "all done"
