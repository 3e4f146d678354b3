"""Target presets: validation, registry lookup, intrinsic checks, and that TVM builds for each."""

import dataclasses

import pytest
import tvm
from tvm.script import tirx as T
from tvm.target.codegen import llvm_get_system_cpu, llvm_get_vector_width, target_has_features

from bitq_tvm.errors import BitqError
from bitq_tvm.targets import TARGETS, CacheLevel, get_target, target_names

REQUIRED = {
    "host", "avx512-vnni", "avx2", "cortex-a53", "cortex-a55", "cortex-a76", "neoverse-n2",
    "rv64gcv-vlen128", "rv64gcv-vlen256", "rv64gc",
}


@T.prim_func(s_tir=True)
def scale_int8(A: T.Buffer((64,), "int8"), B: T.Buffer((64,), "int32")):
    for i in range(64):
        with T.sblock("scale"):
            vi = T.axis.spatial(64, i)
            B[vi] = T.Cast("int32", A[vi]) * 3


def test_registry_has_every_required_preset():
    assert REQUIRED <= set(target_names())
    assert set(TARGETS) == set(target_names()) - {"host"}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_preset_builds_an_llvm_module(name):
    preset = get_target(name)
    target = preset.tvm_target()
    assert str(target.kind) == "llvm"
    executable = tvm.compile(scale_int8, target)
    assert executable.mod.inspect_source("asm")


def test_llvm_features_match_the_declared_intrinsic_family():
    assert not target_has_features("dotprod", get_target("cortex-a53").tvm_target())
    for name in ("cortex-a55", "cortex-a76"):
        target = get_target(name).tvm_target()
        assert target_has_features("dotprod", target) and not target_has_features("i8mm", target)
    assert target_has_features(["dotprod", "i8mm"], get_target("neoverse-n2").tvm_target())
    assert target_has_features("avx512vnni", get_target("avx512-vnni").tvm_target())
    assert not target_has_features("avx512vnni", get_target("avx2").tvm_target())
    for name in ("rv64gcv-vlen128", "rv64gcv-vlen256"):
        preset = get_target(name)
        assert target_has_features("v", preset.tvm_target())
        assert llvm_get_vector_width(preset.tvm_target()) == preset.vector_bits
    assert not target_has_features("v", get_target("rv64gc").tvm_target())


def test_host_resolves_to_this_machine():
    host = get_target("host")
    assert host.tvm_target().attrs["mcpu"] == llvm_get_system_cpu()
    assert host.is_native and host.emulator is None
    expects_vnni = target_has_features(["avx512vnni", "avx512bw"], host.tvm_target())
    assert (host.intrinsic_family == "vnni") == expects_vnni
    assert host.caches[0].name == "L1d" and host.caches[0].size_bytes >= 8 * 1024


def test_unknown_name_lists_known_names():
    with pytest.raises(BitqError) as caught:
        get_target("cortex-a999")
    message = str(caught.value)
    assert "cortex-a999" in message and "\n" not in message
    assert all(name in message for name in REQUIRED)


def test_require_intrinsic():
    with pytest.raises(BitqError, match="cortex-a53.*i8mm"):
        get_target("cortex-a53").require_intrinsic("i8mm")
    with pytest.raises(BitqError, match="rv64gc.*rvv"):
        get_target("rv64gc").require_intrinsic("rvv")
    with pytest.raises(BitqError, match="unknown intrinsic 'amx'"):
        get_target("avx512-vnni").require_intrinsic("amx")
    get_target("neoverse-n2").require_intrinsic("sdot")  # i8mm implies sdot
    get_target("avx512-vnni").require_intrinsic("avx2")


def test_presets_are_immutable_and_hashable():
    preset = get_target("cortex-a76")
    with pytest.raises(TypeError):
        preset.llvm_target["mcpu"] = "cortex-a53"
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.cores = 1
    assert len({preset, get_target("cortex-a76")}) == 1
    assert preset.tvm_target().attrs["mattr"] == ["+neon", "+dotprod"]


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"llvm_target": "llvm -mcpu=cortex-a76"}, "CLI-style"),
        ({"triple": "riscv64-linux-gnu"}, "mtriple"),
        ({"intrinsic_family": "sve"}, "unknown intrinsic family"),
        ({"vector_bits": 100}, "vector_bits"),
        ({"cores": 0}, "cores"),
        ({"caches": (CacheLevel("L1d", 1 << 20, 1.0, True), CacheLevel("L2", 1 << 10, 3.0, True))},
         "grow"),
        ({"cross_package": None}, "go together"),
        ({"name": "Cortex A76"}, "name"),
    ],
)
def test_invalid_presets_are_rejected(change, fragment):
    with pytest.raises(BitqError, match=fragment):
        dataclasses.replace(get_target("cortex-a76"), **change)


def test_cache_level_validation():
    with pytest.raises(BitqError, match="L2.*size_bytes"):
        CacheLevel("L2", 0, 3.0, True)
