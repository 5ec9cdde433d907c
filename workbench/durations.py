"""Durations in words, one formatter for the CLI and the GUI: "45 s", "3 min 05 s", "1 h 12 min"."""

from __future__ import annotations


def human_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def rough_duration(seconds: float) -> str:
    """An estimate in words as precise as it deserves: "under a minute", "about 23 min", "about 1 h 10 min"."""
    if seconds < 60:
        return "under a minute"
    minutes = round(seconds / 60)
    return f"about {minutes} min" if minutes < 60 else f"about {minutes // 60} h {minutes % 60:02d} min"
