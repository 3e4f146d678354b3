"""Shared test configuration: which x86 kernels this host can execute.

The machine a run lands on varies (seen: Zen 4 with AVX-512 VNNI, Zen 3 with AVX2 only). Kernels
for another ISA are always compiled and their assembly checked; a test that *executes* one is
marked ``host_cpu(feature, ...)`` and skipped, with the host CPU named, where the host lacks a
feature (running it would die with SIGILL and take the whole session down).
"""

import pytest
import tvm
from tvm.target.codegen import llvm_get_system_cpu, target_has_features

HOST_CPU = llvm_get_system_cpu()
_HOST_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": HOST_CPU})


def pytest_configure(config):
    config.addinivalue_line("markers", "host_cpu(*features): executes kernels that need these LLVM CPU features")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("host_cpu"):
        missing = [f for f in mark.args if not target_has_features(f, _HOST_TARGET)]
        if missing:
            pytest.skip(f"host CPU {HOST_CPU} lacks {', '.join(missing)}: this kernel is compiled and its "
                        "assembly checked elsewhere, but it cannot run here")
