"""Joining the texts of a recording's chunks into one transcript."""

from __future__ import annotations

from qwenasr_appliance.writing import joins_without_space


def join_texts(parts: list[str]) -> str:
    """Join chunk texts: a space between them, none where either side is Chinese or Japanese writing
    (`writing.joins_without_space`); Korean, Thai and every other script get the space."""
    out = ""
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if out and not (joins_without_space(out[-1]) or joins_without_space(part[0])):
            out += " "
        out += part
    return out
