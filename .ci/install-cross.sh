#!/bin/sh
# Cross compilers and qemu-user for the ARM/RISC-V tests (tests/targets). Idempotent: installs
# only what is missing, so it costs nothing on a machine that already has the tools.
#
# The emulated aarch64 device (tests/targets/test_remote.py) also needs an arm64 python with the
# TVM runtime. The tests build it on first use into ~/.cache/bitq-tvm/aarch64-rootfs (or
# $BITQ_TVM_CACHE_DIR; `bitq-tvm emulator setup` does the same by hand): apt-get download of
# Debian's arm64 python3.11 on a private apt state folder (so no `dpkg --add-architecture arm64`,
# no root, no change to this machine's package state) plus pip download of the aarch64 wheels.
# It needs apt-get and dpkg (checked below), qemu-aarch64, and network access to the Debian
# mirror in /etc/apt/sources* and to PyPI: about 20 s and 450 MB, once. llvm-22 gives llvm-mca-22.
set -eu

missing=""
need() {  # need EXECUTABLE DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing="$missing $2"
}
need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
need aarch64-linux-gnu-g++ g++-aarch64-linux-gnu
need riscv64-linux-gnu-gcc gcc-riscv64-linux-gnu
need riscv64-linux-gnu-g++ g++-riscv64-linux-gnu
need qemu-aarch64 qemu-user
need qemu-riscv64 qemu-user
need cc gcc
need dpkg dpkg                  # dpkg -x unpacks the arm64 python packages
need apt-get apt                # apt-get download fetches them
need llvm-mca-22 llvm-22        # the llvm-mca estimates (bitq_tvm/targets/mca.py); LLVM 14 cannot read LLVM 22 asm

if [ -z "$missing" ]; then
    echo "install-cross: all tools present"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-cross: installing$missing"
$sudo apt-get update -qq
# shellcheck disable=SC2086  # word splitting of the package list is intended
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
