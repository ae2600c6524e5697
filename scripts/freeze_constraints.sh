#!/usr/bin/env bash
# Rewrites scripts/constraints-<extra>.txt, the exact versions scripts/install.sh installs by default,
# from the current Python environment. Refresh them like this, in a new virtual environment:
#   R1PIPE_CONSTRAINTS=none bash scripts/install.sh   # the newest versions pyproject.toml allows
#   python3 -m pytest -q                              # README's test command must pass with them
#   bash scripts/freeze_constraints.sh                # then commit the changed file
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRA=${R1PIPE_EXTRA:-cpu}
OUT=scripts/constraints-${EXTRA}.txt
{
  echo "# Versions the '${EXTRA}' install last passed the test suite with (scripts/freeze_constraints.sh,"
  echo "# $(date -u +%Y-%m-%d), Python $(python3 -c 'import platform; print(platform.python_version())')). scripts/install.sh applies them;"
  echo "# R1PIPE_CONSTRAINTS=none installs the newest versions pyproject.toml allows instead."
  python3 -m pip freeze --exclude-editable | grep -viE '^(r1pipe|pip|setuptools|wheel)[ =@]'
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "wrote $OUT ($(grep -vc '^#' "$OUT") packages)"
