"""Real text available on every machine without a download: the running interpreter's
standard-library sources (used by the perplexity driver and the CPU benchmark)."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_text(min_chars: int) -> str:
    """At least ``min_chars`` characters (or the whole top level of the standard library) of the
    interpreter's standard-library ``*.py`` sources, concatenated in sorted file-name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= min_chars:
            break
    return "\n".join(parts)
