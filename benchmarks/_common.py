"""Shared by the benchmark scripts: print the JSON result and optionally write it to a file."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: Path | None) -> None:
    """Print ``result`` as indented JSON and write the same text to ``out`` (folders created)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
