# Sourced by demo.sh and test.sh: make (once) and enter the project's virtual environment, with
# the project installed in it (editable: `pip install -e ".[test]"`, so `import dstrain` works
# from anywhere and edits take effect at once). Re-installs only when pyproject.toml changed.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! sha256sum --status -c "$VENV/.pyproject.sha256" 2>/dev/null; then
  echo "Installing the project and its pinned dependencies into $VENV ..."
  python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  sha256sum pyproject.toml > "$VENV/.pyproject.sha256"
fi
# DeepSpeed builds its ops (cpu_adam, the CPU all-reduce) on first use. Build them inside this
# venv rather than in ~/.cache/torch_extensions, which every venv and torch version shares (and
# where a build killed in another project leaves a lock that makes runs wait forever).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VIRTUAL_ENV/torch_extensions}
# Quiet the CPU-only notices and keep WandB local unless the user chose otherwise.
export WANDB_MODE=${WANDB_MODE:-offline}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
