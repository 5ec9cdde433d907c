"""Sizes in words: one formatter, binary units, for every size the workbench shows or writes."""

from __future__ import annotations

KIB, MIB, GIB = 2**10, 2**20, 2**30


def format_size(value: float) -> str:
    """Bytes as "512 bytes", "39 KiB", "1.5 MiB" or "5.0 GiB"."""
    if abs(value) >= GIB:
        return f"{value / GIB:,.1f} GiB"
    if abs(value) >= MIB:
        return f"{value / MIB:,.1f} MiB"
    if abs(value) >= KIB:
        return f"{value / KIB:,.0f} KiB"
    return f"{value:,.0f} bytes"
