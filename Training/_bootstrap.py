"""Make ``LiverTumorSegLib`` importable when the scripts run from a source checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def add_repo_to_path() -> None:
    """Make this checkout's ``LiverTumorSegLib`` the one imported: a source checkout runs
    its own engine (and records its own commit), even where another checkout's engine is
    installed; without a checkout beside the scripts, the installed one."""
    if (REPO_ROOT / "LiverTumorSegLib" / "__init__.py").is_file():
        if str(REPO_ROOT) in sys.path:
            sys.path.remove(str(REPO_ROOT))
        sys.path.insert(0, str(REPO_ROOT))
    elif importlib.util.find_spec("LiverTumorSegLib") is None:
        print(f"{Path(sys.argv[0]).name}: error: LiverTumorSegLib is neither beside these scripts ({REPO_ROOT}) nor "
              "installed: pip install 'livertumorseg[train]'", file=sys.stderr)
        raise SystemExit(2)


def run_script(prog: str, main) -> int:
    """Run a script's ``main()``; a ``LiverTumorSegError`` becomes a one-line error and
    exit 2, Ctrl-C (outside Lightning's ``fit``, which handles its own) one line and exit
    130, as a shell reports a job stopped by SIGINT."""
    from LiverTumorSegLib.errors import LiverTumorSegError

    try:
        return main()
    except LiverTumorSegError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: stopped by Ctrl-C", file=sys.stderr)
        return 130
