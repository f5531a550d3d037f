"""Byte sizes from the command line: `268435456`, `1e9`, `256MiB`, `4GiB`, `1.5GB`, `512M`."""

import argparse
import re

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

_SIZE_RE = re.compile(
    r"\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[kKmMgGtT]?)(?P<i>[iI]?)(?P<b>[bB]?)\s*")


def parse_size(text: str) -> int:
    """Parse a byte count.

    * plain numbers, including floats and exponents: ``268435456``, ``1e9``;
    * IEC units (powers of 1024), any case: ``256MiB``, ``4GiB``, ``512Mi``, ``1Ti``;
    * SI units (powers of 1000), any case: ``1GB``, ``500MB``, ``2kb``;
    * a bare letter follows vLLM's ``human_readable_int``: upper case is binary
      (``4G`` = 4 GiB), lower case is decimal (``4g`` = 4·10⁹).

    Raises ValueError with a short message for anything else, or for a size < 1 byte.
    """
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise ValueError(f"invalid size {text!r} (use bytes or e.g. 256MiB, 4GiB, 1e9)")
    num = float(m["num"])
    unit, binary, b = m["unit"], bool(m["i"]), bool(m["b"])
    if binary and not unit:
        raise ValueError(f"invalid size {text!r} (use bytes or e.g. 256MiB, 4GiB, 1e9)")
    if binary or (unit and not b and unit.isupper()):
        mult = _BINARY[unit.lower()]
    else:
        mult = _DECIMAL[unit.lower()]
    value = int(num * mult)
    if value < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def size_arg(text: str) -> int:
    """argparse ``type=`` for a size option: :func:`parse_size`, errors as argparse usage errors."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_size(n: int) -> str:
    """Human form of a byte count (``268435456`` -> ``256.0 MiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
