#!/usr/bin/env bash
# The README's second command: the whole test suite on CPU (real 2-rank DeepSpeed runs included).
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k tokenizer    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
python -m pytest tests "$@"
