"""``python -m fastconn bench``: runs the benchmark suite that lives in the source tree's
``benches/`` (it needs the counting sink built from ``rust/sink`` and the brokers the
scenarios start, so it is a developer tool, not part of the installed package)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def suite_entry() -> Path | None:
    """``benches/run.py`` next to this package's source tree, if this is a checkout."""
    candidate = Path(__file__).resolve().parents[2] / "benches" / "run.py"
    return candidate if candidate.exists() else None


def cli(args: list[str]) -> int:
    entry = suite_entry()
    if entry is None:
        print("fastconn bench: benches/run.py not found; run it from a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(entry), *args]
    sys.path.insert(0, str(entry.parent))
    try:
        runpy.run_path(str(entry), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
