"""Real text available on every machine without a download: the running interpreter's
standard-library sources (used by the perplexity driver and the CPU benchmark)."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    """The interpreter's top-level standard-library ``*.py`` files, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def stdlib_text(min_chars: int) -> str:
    """At least ``min_chars`` characters (or the whole top level of the standard library) of the
    interpreter's standard-library ``*.py`` sources, concatenated in sorted file-name order."""
    parts, size = [], 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= min_chars:
            break
    return "\n".join(parts)
