"""Segmenting a volume node in a child process, so the Slicer GUI stays responsive.

:class:`SegmentationJob` writes the volume (world geometry, uncompressed NRRD) into a
private temporary folder, runs the engine's command line on it through
:class:`~LiverTumorSegLib.runner.EngineRun`, and, only when the run succeeds, builds the
result nodes with :func:`~LiverTumorSegLib.mrml.import_results`. A cancelled or failed
run leaves the scene exactly as it was. The temporary folder is always removed; one
left by a Slicer that crashed (it holds a copy of the patient's CT) is removed by the next
job: each job holds a lock in its folder, which the system releases when the process dies.

The caller drives it: ``start()``, then ``poll()`` from a timer (or ``wait()``), and
``cancel()`` whenever the user asks; ``stop()`` when nothing will poll again.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .errors import LiverTumorSegError
from .locks import lock_now
from .runner import CANCELLED, FAILED, RUNNING, SUCCEEDED, EngineRun, RunEvent, build_command

FOLDER_PREFIX = "LiverTumorSeg-"
LOCK_NAME = "job.lock"
#: A folder younger than this is never swept: its job may not have taken its lock yet.
SWEEP_MIN_AGE_S = 60.0


class SegmentationJob:
    """One segmentation of a volume node by the engine in a child process.

    Args:
        volume_node: the CT volume node.
        segmentation_node: node to update, or None for a new one named after the volume.
        show_3d: show the closed surfaces in 3D views.
        model: model name or folder for ``--model`` (None: the bundled default).
        device: ``auto``, ``cpu`` or ``cuda``.
        fast: one pass without patch overlap.
        python: the interpreter command (default: ``PythonSlicer`` in Slicer).
        env: the child's environment (default: this process's).
        workdir: where the temporary folder goes (default: the system's).
        extra_args: more command-line options (e.g. ``["--threads", "4"]``).
        popen: process factory passed to :class:`EngineRun` (tests may inject a fake).
    """

    def __init__(self, volume_node, *, segmentation_node=None, show_3d: bool = True, model: Optional[str] = None,
                 device: str = "auto", fast: bool = False, python: Optional[Sequence[str]] = None,
                 env: Optional[dict] = None, workdir: Optional[str] = None, extra_args: Sequence[str] = (),
                 popen: Callable = subprocess.Popen) -> None:
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.table_node = None
        self.show_3d = show_3d
        self.model, self.device, self.fast = model, device, fast
        self.python, self.env, self.workdir = python, env, workdir
        self.extra_args = list(extra_args)
        self.popen = popen
        self.run: Optional[EngineRun] = None
        self.state = RUNNING
        self.error = ""
        self._folder: Optional[Path] = None
        self._lock = None

    # -- driving ------------------------------------------------------------------------
    def start(self) -> "SegmentationJob":
        """Write the input and start the child process.

        Raises:
            LiverTumorSegError: the volume cannot be segmented (no voxels, a label map,
                a non-linear transform...) or cannot be written, or the output
                segmentation cannot take its results (:func:`~.mrml.output_problem`);
                nothing was started.
        """
        from .errors import InputError
        from .mrml import output_problem, volume_from_node

        volume = volume_from_node(self.volume_node)
        problem = output_problem(self.segmentation_node, self.volume_node)
        if problem:
            raise InputError(problem)
        sweep_abandoned_folders(Path(self.workdir or tempfile.gettempdir()))
        self._folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=self.workdir))
        try:
            self._lock = _lock_file(self._folder / LOCK_NAME)
            input_path = self._folder / "input.nrrd"
            _write_uncompressed(volume, input_path)
            command = build_command(input_path, self._folder / "output", python=self.python, model=self.model,
                                    device=self.device, fast=self.fast, extra=self.extra_args)
            self.run = EngineRun(command, env=self.env, popen=self.popen).start()
        except Exception:
            self._cleanup()
            raise
        return self

    def poll(self) -> List[RunEvent]:
        """Events since the last call. When the run succeeds, the nodes are built here
        and the last event is ``succeeded`` (or ``failed`` if that went wrong)."""
        if self.run is None or self.state != RUNNING:
            return []
        events = self.run.poll()
        if self.run.state == SUCCEEDED:
            events[-1:] = [self._import()]
        elif self.run.state in (FAILED, CANCELLED):
            self.state, self.error = self.run.state, self.run.error
            self._cleanup()
        return events

    def _import(self) -> RunEvent:
        from .mrml import import_results

        if self.volume_node.GetScene() is None:
            self.state, self.error = FAILED, "The input volume was removed from the scene during the segmentation."
            self._cleanup()
            return RunEvent(FAILED, progress=1.0, message=self.error)
        if self.segmentation_node is not None and self.segmentation_node.GetScene() is None:
            self.segmentation_node = None  # deleted by the user during the run: the results go into new nodes
        try:
            self.segmentation_node, self.table_node = import_results(
                self.volume_node, self._folder / "output", segmentation_node=self.segmentation_node,
                show_3d=self.show_3d, input_name=self.volume_node.GetName())
            self.state = SUCCEEDED
            return RunEvent(SUCCEEDED, progress=1.0, message="done")
        except Exception as exc:  # the scene is unchanged (import_results rolls back); never stay "running"
            self.state = FAILED
            self.error = str(exc) if isinstance(exc, LiverTumorSegError) else f"{type(exc).__name__}: {exc}"
            return RunEvent(FAILED, progress=1.0, message=self.error)
        finally:
            self._cleanup()

    def cancel(self) -> None:
        """Stop the child process; the scene stays as it was."""
        if self.run is not None and self.state == RUNNING:
            self.run.cancel()

    def stop(self) -> str:
        """Cancel and wait (seconds at most) until the child process is gone, then remove
        the temporary folder; nothing is imported and the scene stays as it was. For when
        nothing will poll again: module unload, application exit."""
        if self.run is not None and self.state == RUNNING:
            self.run.stop()
            self.state = CANCELLED
        self._cleanup()
        return self.state

    def wait(self, timeout: Optional[float] = None, on_event: Optional[Callable[[RunEvent], None]] = None) -> str:
        """Block until the job ends (tests, self-tests, scripts); returns the final state.

        Raises:
            TimeoutError: not done within ``timeout`` seconds; the child process has then
                been stopped and the temporary folder removed, as by :meth:`stop`.
        """
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == RUNNING and self.run is not None:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the segmentation did not finish within {timeout} s")
            time.sleep(0.05)
        return self.state

    # -- state --------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        return self.run.progress if self.run is not None else 0.0

    @property
    def message(self) -> str:
        return self.run.message if self.run is not None else ""

    @property
    def warnings(self) -> List[str]:
        return list(self.run.warnings) if self.run is not None else []

    def _cleanup(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the lock (Windows cannot delete an open file)
            self._lock = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _lock_file(path: Path):
    """Open ``path`` and lock it exclusively without waiting; the open handle, or None when
    it is locked already (a live job) or this file system has no locks."""
    handle = open(path, "a+b")
    try:
        lock_now(handle)
        return handle
    except OSError:
        handle.close()
        return None


def sweep_abandoned_folders(root: Path) -> List[Path]:
    """Remove the job folders in ``root`` that no live process holds: a crashed Slicer's
    copies of patients' CTs. Folders younger than :data:`SWEEP_MIN_AGE_S` and folders
    without a lock file are left alone. Returns the folders removed."""
    removed = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(FOLDER_PREFIX) and p.is_dir()]
    except OSError:
        return removed
    for folder in candidates:
        try:
            if time.time() - folder.stat().st_mtime < SWEEP_MIN_AGE_S or not (folder / LOCK_NAME).is_file():
                continue
            handle = _lock_file(folder / LOCK_NAME)
        except OSError:
            continue
        if handle is None:
            continue  # a live job holds it
        handle.close()
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


def _write_uncompressed(volume, path: Path) -> None:
    """Write the CT for the child process (uncompressed: faster, and it is deleted soon)."""
    import SimpleITK as sitk

    from .errors import OutputError

    try:
        sitk.WriteImage(volume.to_sitk(), str(path), useCompression=False)
    except RuntimeError as exc:
        raise OutputError(f"cannot write the volume for segmentation into {path.parent}: {exc}") from None
