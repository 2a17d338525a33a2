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


def test_scripts_outside_a_checkout_use_the_installed_engine_or_say_it_is_missing(tmp_path):
    """Copied out of a checkout (nothing beside them), the scripts import the installed
    engine; with none installed, one line and exit 2, not an ImportError traceback."""
    alone = tmp_path / "scripts-only" / "Training"
    alone.mkdir(parents=True)
    shutil.copy(REPO / "Training" / "_bootstrap.py", alone)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _bootstrap; _bootstrap.add_repo_to_path(); "
            "import LiverTumorSegLib; print(LiverTumorSegLib.__file__)")
    installed = subprocess.run([sys.executable, "-c", code, str(alone)], capture_output=True, text=True,
                               env={"PYTHONPATH": str(REPO), "PATH": ""}, cwd=tmp_path, timeout=60)
    assert installed.stdout.strip() == str(REPO / "LiverTumorSegLib" / "__init__.py"), installed.stderr
    # -S: no site-packages, so no engine installed anywhere
    none = subprocess.run([sys.executable, "-S", "-c", code, str(alone)], capture_output=True, text=True,
                          env={"PATH": ""}, cwd=tmp_path, timeout=60)
    assert none.returncode == 2 and "Traceback" not in none.stderr, none.stderr
    assert "LiverTumorSegLib is neither beside these scripts" in none.stderr and len(none.stderr.splitlines()) == 1


def test_ctrl_c_outside_training_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C before Lightning's fit (reading the data, caching it) or in evaluate/export:
    one line and the shell's exit code for SIGINT, not Python's traceback."""
    code = ("import sys\nsys.path.insert(0, sys.argv[1])\nimport _bootstrap\n_bootstrap.add_repo_to_path()\n"
            "def main():\n    raise KeyboardInterrupt\n"
            "sys.exit(_bootstrap.run_script('train.py', main))\n")
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "Training")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "train.py: stopped by Ctrl-C"
