"""The Training scripts run the engine of their own checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys

from .helpers import REPO


def test_a_second_checkouts_scripts_use_its_own_engine_not_the_installed_one(tmp_path):
    """With an engine importable from elsewhere (this checkout, as an editable install
    would make it), a second checkout's Training scripts must import the second
    checkout's engine: the model card records that checkout's commit."""
    other = tmp_path / "other-checkout"
    (other / "Training").mkdir(parents=True)
    shutil.copy(REPO / "Training" / "_bootstrap.py", other / "Training")
    (other / "LiverTumorSegLib").mkdir()
    (other / "LiverTumorSegLib" / "__init__.py").write_text("WHICH = 'the other checkout'\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _bootstrap; _bootstrap.add_repo_to_path(); "
            "import LiverTumorSegLib; print(getattr(LiverTumorSegLib, 'WHICH', LiverTumorSegLib.__file__))")
    result = subprocess.run([sys.executable, "-c", code, str(other / "Training")], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=60)
    assert result.stdout.strip() == "the other checkout", result.stderr
