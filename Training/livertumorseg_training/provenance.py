"""Where a model came from: git commit, versions, the command line, the time."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_state(repo: Path = REPO_ROOT) -> dict:
    """``{"commit": sha or "unknown", "dirty": bool or None}`` of the checkout."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def environment() -> dict:
    """Versions of the libraries that shape a model."""
    import lightning
    import torch
    import torchio

    from LiverTumorSegLib import __version__

    return {
        "python": platform.python_version(), "torch": str(torch.__version__), "lightning": str(lightning.__version__),
        "torchio": str(torchio.__version__), "livertumorseg": str(__version__), "platform": platform.platform(),
    }


def command_line() -> str:
    """The command that is running, as typed (``python Training/train.py ...``)."""
    import shlex

    return " ".join(["python"] + [shlex.quote(a) for a in sys.argv])


def now_utc() -> str:
    """ISO 8601 UTC timestamp, seconds precision."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
