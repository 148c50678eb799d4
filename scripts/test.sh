#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (unit + real-model integration).
# pytest's exit 5 (no tests collected) is a failure here, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 3
# Two workers, a test file each at a time (module fixtures stay in one process): the long real-model
# runs are single-threaded for minutes at a stretch (ExecuTorch's lowering, QEMU, the TVM build), so on
# 2 cores two of them side by side take little longer than one. Files in collection order, not xdist's
# "most tests first" (which left the longest single-test files to the end): the real-model files come
# first. Each run's --threads is the cores over the workers (tests/integration/helpers.py).
# SLM_TEST_WORKERS=0 runs in one process.
# Lint first (seconds): ruff's rules include C901 and PLR0915, the package's complexity limits (pyproject.toml).
.venv/bin/ruff check slm_export tests scripts || exit 1
workers="${SLM_TEST_WORKERS:-2}"
# The real-model tests write up to about 2 GB at a time (each passed test's folder is deleted when it ends:
# pyproject.toml); on a disk with less free than that, every later test fails on a write, so say so first.
free_kb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
if [ -n "$free_kb" ] && [ "$free_kb" -lt 4000000 ]; then
  echo "warning: $((free_kb / 1024)) MB free under ${TMPDIR:-/tmp}; the suite holds up to about 2 GB there while it runs" >&2
fi
# A worker killed mid-file (out of memory) can leave pytest-xdist waiting for it for ever: a bound turns a
# hang into a failure that says so (the suite takes about half of it on 2 cores).
limit="${SLM_TEST_TIMEOUT:-3600}"
if [ "$workers" -gt 0 ] 2>/dev/null; then
  timeout -k 30 "$limit" .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
else
  timeout -k 30 "$limit" .venv/bin/python -m pytest -q "$@"
fi
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "the test suite did not finish within ${limit} s (a hung or killed worker?): failing" >&2
  exit 1
fi
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
