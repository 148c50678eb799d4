#!/usr/bin/env bash
# Build (once, cached) an aarch64 CPython 3.11 + numpy + onnxruntime + apache-tvm environment
# that runs on an x86_64 Debian 12 host under qemu-aarch64-static -cpu cortex-a72 (Raspberry Pi 4 CPU).
#
# Tested 2026-11-25 on Debian 12 (bookworm) x86_64, as root, no binfmt_misc, network = Debian + PyPI only:
#   qemu-user-static 1:7.2+dfsg-7+deb12u18, mmdebstrap 1.3.5, gcc-aarch64-linux-gnu 12.2,
#   Debian arm64 python3.11 3.11.2, numpy 2.4.6, onnxruntime 1.32.0, apache-tvm 0.27.0.post1,
#   apache-tvm-ffi 0.1.15.post2, ml_dtypes 0.6.0.
#
# Usage:  bash qemu_setup.sh [ROOT]            (default ROOT=/tmp/tvmr)
#   env: RUNTIME_ONLY=1   delete tvm/lib/libtvm_compiler.so from the aarch64 site (-229 MB;
#                         TVM then loads runtime-only, which is all a deployed .so needs)
#        PKGS="..."       pip requirement list for the aarch64 site
#        HOST_PIP=...     host pip used to fetch aarch64 wheels (default: python3 -m pip)
# Result:
#   ROOT/sysroot          Debian bookworm arm64 rootfs, packages only extracted (84 MB)
#   ROOT/asite            aarch64 wheels installed with pip --target (438 MB, 209 MB runtime-only)
#   ROOT/fake/cpuinfo     a Raspberry Pi 4 /proc/cpuinfo
#   ROOT/bin/apy          wrapper: `ROOT/bin/apy script.py args` = aarch64 python3.11 under QEMU,
#                         with /proc/cpuinfo faked (needed by onnxruntime's cpuinfo, see below)
#   ROOT/bin/apy-nofake   same without the cpuinfo bind mount (numpy / TVM need nothing more)
#   Both set TVM_USE_RUNTIME_LIB=1 unless it is set: TVM loads only libtvm_runtime.so.
set -euo pipefail
ROOT=${1:-${ROOT:-/tmp/tvmr}}
SYSROOT=$ROOT/sysroot
SITE=$ROOT/asite
HOST_PIP=${HOST_PIP:-python3 -m pip}
PKGS=${PKGS:-"numpy onnxruntime==1.32.0 apache-tvm==0.27.0.post1"}
SUITE=bookworm
# The host's own apt mirror (deb822 sources or sources.list), unless MIRROR is given.
MIRROR=${MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)}
MIRROR=${MIRROR:-$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
[ -n "$MIRROR" ] || { echo "no apt mirror found in /etc/apt: set MIRROR" >&2; exit 2; }
mkdir -p "$ROOT/bin" "$ROOT/fake"

# 1. host tools (Debian). qemu-user-static: the emulator; mmdebstrap: arm64 rootfs without
#    binfmt_misc/chroot; cross gcc: tvm export_library(cc="aarch64-linux-gnu-gcc").
need=()
for c in qemu-aarch64-static:qemu-user-static mmdebstrap:mmdebstrap \
         aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu aarch64-linux-gnu-g++:g++-aarch64-linux-gnu; do
  command -v "${c%%:*}" >/dev/null || need+=("${c##*:}")
done
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# 2. arm64 sysroot: only extract .debs (variant "extract" resolves dependencies of --include but
#    runs no maintainer scripts, so no emulation/binfmt is needed). ~8 s, 84 MB.
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  rm -rf "$SYSROOT"
  mmdebstrap --quiet --variant=extract --architectures=arm64 \
    --include=python3,python3-venv,libstdc++6 \
    "$SUITE" "$SYSROOT" "deb $MIRROR $SUITE main"
fi

# 3. aarch64 wheels, fetched and unpacked by the HOST pip (no pip under emulation).
#    Several --platform values are needed: pip does not expand them to older manylinux tags, and
#    apache-tvm ships only py3-none-manylinux_2_27/2_28_aarch64 (so manylinux2014_aarch64 alone
#    finds NO apache-tvm), tvm-ffi manylinux_2_24/2_28, protobuf manylinux2014.
if [ ! -f "$SITE/.done" ]; then
  rm -rf "$SITE"
  $HOST_PIP install --quiet --target "$SITE" --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
    --platform manylinux_2_24_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 --platform linux_aarch64 \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    $PKGS
  touch "$SITE/.done"
fi
if [ "${RUNTIME_ONLY:-0}" = 1 ]; then rm -f "$SITE/tvm/lib/libtvm_compiler.so"; fi

# 4. A Raspberry Pi 4 /proc/cpuinfo. QEMU 7.2 user mode passes the HOST's /proc/cpuinfo through;
#    onnxruntime's bundled pytorch/cpuinfo then finds no ARM fields and the import segfaults
#    ("qemu: uncaught target signal 11"). Bind-mounting this file over /proc/cpuinfo inside a
#    private mount namespace fixes it.
python3 - "$ROOT/fake/cpuinfo" <<'EOF'
import sys
blk = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
       "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
       "CPU revision\t: 3\n")
s = "\n".join(blk.format(i=i) for i in range(4))
s += "\nHardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"
open(sys.argv[1], "w").write(s)
EOF

# 5. wrappers. QEMU_CPU defaults to cortex-a72 so code using newer ISA (dotprod, fp16, SVE)
#    dies with SIGILL, as it would on the Pi.
cat > "$ROOT/bin/apy-nofake" <<EOF
#!/bin/sh
export PYTHONPATH="$SITE\${PYTHONPATH:+:\$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
# runtime-only TVM by default (import 2.5 s instead of 8-17 s under QEMU); set 0 to load the compiler
export TVM_USE_RUNTIME_LIB="\${TVM_USE_RUNTIME_LIB:-1}"
exec qemu-aarch64-static -cpu "\${QEMU_CPU:-cortex-a72}" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "\$@"
EOF
cat > "$ROOT/bin/apy" <<EOF
#!/bin/sh
# root: plain 'unshare -m'; non-root: 'unshare -r -m' (user namespace) may work where allowed.
U="unshare -m --propagation private"; [ "\$(id -u)" = 0 ] || U="unshare -r -m --propagation private"
exec \$U sh -c 'mount --bind "$ROOT/fake/cpuinfo" /proc/cpuinfo && exec "$ROOT/bin/apy-nofake" "\$@"' apy "\$@"
EOF
chmod +x "$ROOT/bin/apy" "$ROOT/bin/apy-nofake"

# 6. smoke test
TVM_USE_RUNTIME_LIB=1 "$ROOT/bin/apy" -c 'import platform, numpy, onnxruntime as ort
import tvm
from tvm.runtime.vm import VirtualMachine
print("OK", platform.machine(), platform.python_version(), "numpy", numpy.__version__,
      "ort", ort.__version__, "tvm", tvm.__version__)'
du -sh "$SYSROOT" "$SITE"
