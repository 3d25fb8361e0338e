"""Writing a benchmark's results into its own marked section of BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(name: str, heading: str, body: str) -> None:
    """Replace the section between name's markers, or append it under heading."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body}\n{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.escape(begin) + ".*?" + re.escape(end)
    if begin in text:
        text = re.sub(pattern, lambda _: section, text, flags=re.S)
    else:
        text += f"\n## {heading}\n\n{section}\n"
    BENCHMARKS.write_text(text)
