"""Make ``LiverTumorSegLib`` importable when the scripts run from a source checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def add_repo_to_path() -> None:
    """Put the repository root on ``sys.path`` unless ``LiverTumorSegLib`` is installed."""
    if importlib.util.find_spec("LiverTumorSegLib") is None:
        sys.path.insert(0, str(REPO_ROOT))


def run_script(prog: str, main) -> int:
    """Run a script's ``main()``; a ``LiverTumorSegError`` becomes a one-line error and exit 2."""
    from LiverTumorSegLib.errors import LiverTumorSegError

    try:
        return main()
    except LiverTumorSegError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
