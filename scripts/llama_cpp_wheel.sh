#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp's Python bindings: they run the llamacpp backend's model.gguf in
# validation and in tests/unit/test_llamacpp.py) into the environment of $PYTHON (default: python).
#
# The package registry has it as a source package only: pip builds llama.cpp with cmake and a C/C++ compiler,
# 10-20 minutes on 2 cores. The built wheel is kept in $SLM_EXPORT_WHEELS (default
# ~/.cache/slm-export/wheels), under a name that holds the version, the machine and the build flags, and
# reused when present, so a second setup (CI with that folder cached) installs it in seconds.
#
# x86: built for the instruction sets this CPU reports, never AMX. The default build (-march=native) turns on
# llama.cpp's AMX matrix kernel where the CPU has AMX, and that kernel crashed (a segmentation fault in
# ggml_backend_amx_mul_mat) on every quantized GGUF (docs/backends.md). Elsewhere llama.cpp's native build.
# SLM_EXPORT_NO_LLAMA_CPP=1 skips it (the GGUF is still written; its llama.cpp checks are skipped).
set -euo pipefail
VERSION=0.3.36
PY=${PYTHON:-python}
if [ "${SLM_EXPORT_NO_LLAMA_CPP:-0}" = 1 ]; then
  echo "llama-cpp-python: skipped (SLM_EXPORT_NO_LLAMA_CPP=1)" >&2
  exit 0
fi
if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  exit 0  # already there, at this version
fi

cmake_args() {
  # the CPU's flags as llama.cpp's CMake options (x86 only: no AMX; other machines build natively)
  [ "$(uname -m)" = x86_64 ] || return 0
  local flags opts=("-DGGML_NATIVE=OFF" "-DGGML_AMX_TILE=OFF" "-DGGML_AMX_INT8=OFF" "-DGGML_AMX_BF16=OFF")
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  local pair
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
              avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case "$flags" in *" ${pair%%:*} "*) opts+=("-DGGML_${pair##*:}=ON") ;; esac
  done
  echo "${opts[*]}"
}

args=$(cmake_args)
key="$VERSION-$(uname -m)-$(printf %s "$args" | sha256sum | cut -c1-12)"
dir="${SLM_EXPORT_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/slm-export/wheels}/llama-cpp-python-$key"
wheel=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "llama-cpp-python $VERSION: building llama.cpp (10-20 minutes; cached in $dir)${args:+ with $args}" >&2
  mkdir -p "$dir.partial"
  if ! CMAKE_ARGS="$args" "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
      -w "$dir.partial" "llama-cpp-python==$VERSION"; then
    rm -rf "$dir.partial"
    echo "setup: llama-cpp-python did not build (needs cmake's download and a C/C++ compiler); the llama.cpp" \
         "tests will be skipped" >&2
    exit 0
  fi
  rm -rf "$dir" && mv "$dir.partial" "$dir"
  wheel=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl | head -1)
fi
"$PY" -m pip install -q "$wheel" 2>&1 | grep -v "is ignored" || true
"$PY" -c "import llama_cpp" || { echo "setup: llama-cpp-python from $wheel does not import" >&2; exit 1; }
