"""BFPFormat validation, derived quantities, names, presets and spec parsing."""

import dataclasses

import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import (
    PRESETS,
    BFPFormat,
    Rounding,
    get_format,
    parse_format,
    parse_format_name,
)


def test_defaults_and_derived_quantities():
    fmt = BFPFormat(mantissa_bits=6, block_size=16)
    assert fmt.exponent_bits == 8
    assert fmt.rounding is Rounding.NEAREST
    assert fmt.seed == 0
    assert (fmt.emin, fmt.emax) == (-127, 127)
    assert (fmt.qmin, fmt.qmax) == (-32, 31)
    assert fmt.scale_shift == 4
    assert fmt.bits_per_element == 6 + 8 / 16
    small = BFPFormat(mantissa_bits=2, block_size=1, exponent_bits=2)
    assert (small.emin, small.emax, small.qmin, small.qmax) == (-1, 1, -2, 1)
    assert small.bits_per_element == 4.0


def test_block_count_and_packed_bytes():
    fmt = BFPFormat(mantissa_bits=4, block_size=16)
    assert fmt.num_blocks(64) == 4
    assert fmt.num_blocks(65) == 5  # ragged last block
    assert fmt.num_blocks(48, groups=3) == 3
    assert fmt.num_blocks(60, groups=3) == 6  # 20 per group -> 2 blocks each
    # one block: 16 * 4 mantissa bits + 8 exponent bits = 72 bits = 9 bytes
    assert fmt.packed_bytes(1) == 9
    assert BFPFormat(mantissa_bits=3, block_size=5, exponent_bits=5).packed_bytes(1) == 3  # 20 bits


def test_frozen_and_hashable():
    fmt = BFPFormat(mantissa_bits=8, block_size=32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.block_size = 16  # type: ignore[misc]
    assert {fmt: 1}[BFPFormat(8, 32)] == 1


def test_rounding_string_is_normalised_to_enum():
    fmt = BFPFormat(mantissa_bits=6, block_size=32, rounding="stochastic", seed=7)
    assert fmt.rounding is Rounding.STOCHASTIC
    assert fmt == BFPFormat(6, 32, rounding=Rounding.STOCHASTIC, seed=7)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(mantissa_bits=1, block_size=32), "mantissa_bits"),
        (dict(mantissa_bits=9, block_size=32), "mantissa_bits"),
        (dict(mantissa_bits=8, block_size=0), "block_size"),
        (dict(mantissa_bits=8, block_size=65537), "block_size"),
        (dict(mantissa_bits=8, block_size=32, exponent_bits=1), "exponent_bits"),
        (dict(mantissa_bits=8, block_size=32, exponent_bits=9), "exponent_bits"),
        (dict(mantissa_bits=8, block_size=32, seed=3), "seed"),  # seed with nearest
        (dict(mantissa_bits=8, block_size=32, rounding="stochastic", seed=-1), "seed"),
        (dict(mantissa_bits=8, block_size=32, rounding="stochastic", seed=2**32), "seed"),
        (dict(mantissa_bits=8, block_size=32, rounding="truncate"), "rounding"),
        (dict(mantissa_bits=8.0, block_size=32), "mantissa_bits"),
        (dict(mantissa_bits=True, block_size=32), "mantissa_bits"),
        (dict(mantissa_bits=8, block_size="32"), "block_size"),
    ],
)
def test_invalid_format_raises_naming_the_option(kwargs, option):
    with pytest.raises(BitqError, match=option):
        BFPFormat(**kwargs)


def test_extreme_valid_formats():
    BFPFormat(mantissa_bits=2, block_size=1, exponent_bits=2)
    BFPFormat(mantissa_bits=8, block_size=65536, exponent_bits=8)
    BFPFormat(mantissa_bits=8, block_size=1, rounding="stochastic", seed=2**32 - 1)


@pytest.mark.parametrize(
    "fmt, name",
    [
        (BFPFormat(8, 32), "bfp8_b32"),
        (BFPFormat(4, 16, exponent_bits=5), "bfp4_b16_e5"),
        (BFPFormat(6, 32, rounding="stochastic", seed=7), "bfp6_b32_sr7"),
        (BFPFormat(6, 32, rounding="stochastic"), "bfp6_b32_sr0"),
        (BFPFormat(3, 7, exponent_bits=2, rounding="stochastic", seed=12), "bfp3_b7_e2_sr12"),
    ],
)
def test_canonical_names(fmt, name):
    assert fmt.name == name
    assert str(fmt) == name
    assert parse_format_name(name) == fmt
    assert get_format(name) == fmt


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_every_preset_round_trips_by_name(key):
    fmt = PRESETS[key]
    assert fmt.name == key
    assert get_format(key) is fmt
    assert parse_format_name(fmt.name) == fmt
    assert parse_format(key) == fmt


def test_required_presets_exist():
    for name in ("bfp8_b32", "bfp8_b16", "bfp6_b16", "bfp6_b32", "bfp4_b16", "bfp4_b32"):
        assert name in PRESETS
    mxint8 = PRESETS["bfp8_b32"]
    assert (mxint8.mantissa_bits, mxint8.block_size, mxint8.exponent_bits) == (8, 32, 8)


@pytest.mark.parametrize("mantissa_bits", range(2, 9))
@pytest.mark.parametrize("block_size", [1, 3, 16, 32, 65536])
@pytest.mark.parametrize("exponent_bits", [2, 5, 8])
@pytest.mark.parametrize("seed", [None, 0, 4294967295])
def test_generated_names_round_trip(mantissa_bits, block_size, exponent_bits, seed):
    rounding = Rounding.NEAREST if seed is None else Rounding.STOCHASTIC
    fmt = BFPFormat(mantissa_bits, block_size, exponent_bits, rounding, seed or 0)
    assert get_format(fmt.name) == fmt
    assert parse_format(fmt.name) == fmt


def test_non_canonical_spellings_are_accepted():
    assert get_format("  BFP8_B32 ") == PRESETS["bfp8_b32"]
    assert get_format("bfp4_b16_e8") == BFPFormat(4, 16)
    assert get_format("bfp4_b16_e8").name == "bfp4_b16"


@pytest.mark.parametrize("name", ["int8", "bfp8", "bfp8_b32_x", "mxfp4", "", "bfp8-b32"])
def test_unknown_name_lists_presets(name):
    with pytest.raises(BitqError) as info:
        get_format(name)
    message = str(info.value)
    assert "\n" not in message
    assert repr(name) in message
    for preset in PRESETS:
        assert preset in message


@pytest.mark.parametrize(
    "name, option",
    [
        ("bfp9_b32", "mantissa_bits"),
        ("bfp1_b32", "mantissa_bits"),
        ("bfp8_b0", "block_size"),
        ("bfp8_b32_e9", "exponent_bits"),
        ("bfp8_b32_e1", "exponent_bits"),
        ("bfp8_b32_sr4294967296", "seed"),
    ],
)
def test_well_formed_name_with_invalid_value_names_format_and_option(name, option):
    with pytest.raises(BitqError, match=rf"'{name}'.*{option}"):
        get_format(name)


def test_parse_format_specs():
    fmt = BFPFormat(6, 32)
    assert parse_format(None) is None
    assert parse_format("fp32") is None
    assert parse_format("FP32") is None
    assert parse_format(fmt) is fmt
    assert parse_format("bfp6_b32") == fmt
    assert parse_format({"mantissa_bits": 6, "block_size": 32}) == fmt
    assert parse_format({"name": "bfp6_b32_sr3"}) == BFPFormat(6, 32, rounding="stochastic", seed=3)
    spec = {"mantissa_bits": 4, "block_size": 8, "exponent_bits": 4, "rounding": "stochastic"}
    assert parse_format({**spec, "seed": 1}) == BFPFormat(4, 8, 4, Rounding.STOCHASTIC, 1)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"mantissa_bits": 6, "block": 32}, "unknown keys"),
        ({"mantissa_bits": 6}, "block_size"),
        ({"mantissa_bits": 6, "block_size": 32, "seed": 5}, "seed"),
        (8, "must be a name"),
        ("bfp", "unknown BFP format"),
    ],
)
def test_parse_format_rejects_bad_specs(spec, fragment):
    with pytest.raises(BitqError, match=fragment):
        parse_format(spec)
