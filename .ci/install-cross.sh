#!/bin/sh
# Cross compilers and qemu-user for the ARM/RISC-V tests (tests/targets). Idempotent: installs
# only what is missing, so it costs nothing on a machine that already has the tools.
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
