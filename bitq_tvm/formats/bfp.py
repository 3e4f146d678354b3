"""The block-floating-point (BFP) format: mantissa bits, block size, shared-exponent bits, rounding.

A :class:`BFPFormat` is an immutable, validated value. Its canonical name
``bfp{m}_b{B}[_e{E}][_sr{seed}]`` (the ``_e`` part only when E != 8, the ``_sr`` part only for
stochastic rounding) identifies it in plans, CLI options and reports, and
:func:`parse_format_name` inverts it.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from ..errors import BitqError

MIN_MANTISSA_BITS = 2
MAX_MANTISSA_BITS = 8
MIN_EXPONENT_BITS = 2
MAX_EXPONENT_BITS = 8
MAX_BLOCK_SIZE = 65536  # int8 x int8 products summed over one block stay exact in int32
MAX_SEED = 2**32 - 1

FORMAT_NAME_PATTERN = re.compile(r"bfp(\d+)_b(\d+)(?:_e(\d+))?(?:_sr(\d+))?")


class Rounding(str, enum.Enum):
    """How a scaled value becomes an integer mantissa."""

    NEAREST = "nearest"  # round half to even
    STOCHASTIC = "stochastic"  # floor(v + u), u from a seeded counter-based hash


def _check_int(value, option: str, low: int, high: int) -> None:
    # bool is an int subclass; True as a bit count is always a mistake
    if isinstance(value, bool) or not isinstance(value, int):
        raise BitqError(f"BFP format option {option} must be an int, got {value!r}")
    if not low <= value <= high:
        raise BitqError(f"BFP format option {option} must be in {low}..{high}, got {value}")


@dataclasses.dataclass(frozen=True)
class BFPFormat:
    """A BFP number format.

    Parameters
    ----------
    mantissa_bits : int
        m, bits per element including the sign bit (2..8); mantissas lie in [-2**(m-1), 2**(m-1)-1].
    block_size : int
        B, elements sharing one exponent (1..65536).
    exponent_bits : int
        E, bits of the shared exponent (2..8); exponents lie in [-(2**(E-1)-1), 2**(E-1)-1].
    rounding : Rounding or str
        ``"nearest"`` (half to even) or ``"stochastic"``.
    seed : int
        Stochastic-rounding seed (uint32); must be 0 with nearest rounding.
    """

    mantissa_bits: int
    block_size: int
    exponent_bits: int = 8
    rounding: Rounding = Rounding.NEAREST
    seed: int = 0

    def __post_init__(self):
        _check_int(self.mantissa_bits, "mantissa_bits", MIN_MANTISSA_BITS, MAX_MANTISSA_BITS)
        _check_int(self.block_size, "block_size", 1, MAX_BLOCK_SIZE)
        _check_int(self.exponent_bits, "exponent_bits", MIN_EXPONENT_BITS, MAX_EXPONENT_BITS)
        try:
            rounding = Rounding(self.rounding)
        except ValueError:
            valid = ", ".join(r.value for r in Rounding)
            raise BitqError(
                f"BFP format option rounding must be one of {valid}, got {self.rounding!r}"
            ) from None
        # frozen: normalise a plain string to the enum so equality and hashing are by value
        object.__setattr__(self, "rounding", rounding)
        _check_int(self.seed, "seed", 0, MAX_SEED)
        if rounding is Rounding.NEAREST and self.seed != 0:
            raise BitqError(
                f"BFP format option seed must be 0 with nearest rounding, got {self.seed}"
            )

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``bfp8_b32``, ``bfp4_b16_e5``, ``bfp6_b32_sr7``."""
        name = f"bfp{self.mantissa_bits}_b{self.block_size}"
        if self.exponent_bits != MAX_EXPONENT_BITS:
            name += f"_e{self.exponent_bits}"
        if self.rounding is Rounding.STOCHASTIC:
            name += f"_sr{self.seed}"
        return name

    @property
    def emax(self) -> int:
        """Largest shared exponent, 2**(E-1) - 1."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Smallest shared exponent, -emax (symmetric, like the E8M0 range [-127, 127])."""
        return -self.emax

    @property
    def qmax(self) -> int:
        """Largest mantissa, 2**(m-1) - 1."""
        return 2 ** (self.mantissa_bits - 1) - 1

    @property
    def qmin(self) -> int:
        """Smallest mantissa, -2**(m-1)."""
        return -(2 ** (self.mantissa_bits - 1))

    @property
    def scale_shift(self) -> int:
        """m - 2: the block scale is 2**(e - scale_shift), so 2**e maps to mantissa 2**(m-2)."""
        return self.mantissa_bits - 2

    @property
    def bits_per_element(self) -> float:
        """Average storage bits per element: m + E / B."""
        return self.mantissa_bits + self.exponent_bits / self.block_size

    def num_blocks(self, length: int, groups: int = 1) -> int:
        """Blocks covering an axis of ``length`` elements split into ``groups`` equal segments."""
        return groups * -(-(length // groups) // self.block_size)

    def packed_bytes(self, num_blocks: int) -> int:
        """Bytes to store ``num_blocks`` blocks with mantissas and exponents bit-packed."""
        bits = num_blocks * (self.block_size * self.mantissa_bits + self.exponent_bits)
        return -(-bits // 8)

    def __str__(self) -> str:
        return self.name


def parse_format_name(name: str) -> BFPFormat:
    """Parse a canonical format name ``bfp{m}_b{B}[_e{E}][_sr{seed}]``.

    Raises
    ------
    BitqError
        If ``name`` does not match the pattern or names an invalid format.
    """
    match = FORMAT_NAME_PATTERN.fullmatch(name)
    if match is None:
        raise BitqError(
            f"BFP format name {name!r} does not match bfp{{m}}_b{{B}}[_e{{E}}][_sr{{seed}}]"
        )
    mantissa, block, exponent, seed = match.groups()
    try:
        return BFPFormat(
            mantissa_bits=int(mantissa),
            block_size=int(block),
            exponent_bits=MAX_EXPONENT_BITS if exponent is None else int(exponent),
            rounding=Rounding.NEAREST if seed is None else Rounding.STOCHASTIC,
            seed=0 if seed is None else int(seed),
        )
    except BitqError as err:
        raise BitqError(f"BFP format {name!r}: {err}") from None
