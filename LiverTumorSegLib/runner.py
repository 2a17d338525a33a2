"""Running the engine's command line in a child process, for front ends that must stay
responsive (the Slicer module runs inference here, outside its GUI thread).

:class:`EngineRun` starts ``python -m LiverTumorSegLib segment IN -o OUT --progress
json``, reads the child's stdout (JSON lines) and stderr on two reader threads, and hands
the parsed :class:`RunEvent` objects to whoever calls :meth:`EngineRun.poll` (a Qt timer
in Slicer, a loop in tests). Nothing here imports Qt or Slicer.

* Progress: ``{"event": "progress", "progress": f, "message": m}`` lines, f in [0, 1].
* Success: a ``{"event": "done", "outputs": {...}}`` line and exit code 0.
* User errors: exit code 2 and one ``livertumorseg: error: ...`` line on stderr, which
  becomes :attr:`EngineRun.error`.
* Cancel: :meth:`EngineRun.cancel` sends SIGTERM to the child's whole process group
  (the ``PythonSlicer`` launcher and the Python it starts), then kills it after a grace
  period; the command line writes nothing when stopped. On Windows the tree is ended at
  once (``taskkill /T /F``): a console process started without a window cannot be asked
  to stop. :meth:`EngineRun.stop` does the same and waits until the tree is gone, for
  when nothing will poll again (module unload, application exit).
* GPU out of memory: a run on ``auto``/``cuda`` that dies of CUDA out-of-memory is
  started again once with ``--device cpu``, and a ``warning`` event says so.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .torch_versions import TORCH_MINIMUM, release

LIB_PARENT = Path(__file__).resolve().parent.parent
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory")
ERROR_PREFIX = "livertumorseg: error:"
WARNING_PREFIX = "livertumorseg: warning:"
EXIT_CANCELLED = 130

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


@dataclass
class RunEvent:
    """One thing that happened in the child process.

    Attributes:
        kind: ``progress``, ``done``, ``warning``, ``log`` (other output), or the final
            ``succeeded``, ``failed`` or ``cancelled``.
        progress: fraction of the whole job done, in [0, 1].
        message: human-readable text (progress stage, warning or error message).
        data: the parsed JSON event (``done`` carries ``outputs`` and ``summary``).
    """

    kind: str
    progress: float = 0.0
    message: str = ""
    data: dict = field(default_factory=dict)


def parse_stdout_line(line: str) -> RunEvent:
    """Turn one stdout line of ``--progress json`` into an event (``log`` if not JSON)."""
    text = line.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return RunEvent("log", message=text)
    if not isinstance(data, dict) or "event" not in data:
        return RunEvent("log", message=text)
    kind = str(data["event"])
    if kind == "progress":
        return RunEvent("progress", progress=float(data.get("progress", 0.0)),
                        message=str(data.get("message", "")), data=data)
    if kind == "done":
        return RunEvent("done", progress=1.0, message="done", data=data)
    return RunEvent("log", message=text, data=data)


def parse_stderr_line(line: str) -> RunEvent:
    """A stderr line: the engine's one-line error, a warning, or other log text."""
    text = line.rstrip()
    if text.startswith(ERROR_PREFIX):
        return RunEvent("error", message=text[len(ERROR_PREFIX):].strip())
    if text.startswith(WARNING_PREFIX):
        return RunEvent("warning", message=text[len(WARNING_PREFIX):].strip())
    if "Warning:" in text or "warning:" in text or "GPU memory ran out" in text:  # Python's, not ITK's "WARNING:"
        return RunEvent("warning", message=text.split("Warning:", 1)[-1].strip())
    return RunEvent("log", message=text)


def default_python() -> List[str]:
    """The interpreter that runs the engine: ``PythonSlicer`` inside Slicer, else this one."""
    import shutil

    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        beside = [Path(sys.executable).parent / name for name in ("PythonSlicer", "PythonSlicer.exe")]
        found = shutil.which("PythonSlicer") or next((str(p) for p in beside if p.is_file()), None)
        if found:
            return [found]
    return [sys.executable]


def build_command(input_path: Path, output_dir: Path, *, python: Optional[Sequence[str]] = None,
                  model: Optional[str] = None, device: str = "auto", fast: bool = False,
                  extra: Sequence[str] = ()) -> List[str]:
    """The command line that segments ``input_path`` into ``output_dir``.

    Surfaces and the preview are not written: a front end makes its own from the labels.
    """
    cmd = list(python or default_python()) + [
        "-m", "LiverTumorSegLib", "segment", str(input_path), "-o", str(output_dir),
        "--progress", "json", "--no-surfaces", "--no-preview", "--device", device,
    ]
    if model:
        cmd += ["--model", str(model)]
    if fast:
        cmd.append("--fast")
    return cmd + list(extra)


class EngineRun:
    """One segmentation run of the engine in a child process; never blocks the caller.

    Args:
        command: from :func:`build_command`.
        env: environment of the child (default: this process's); the Lib's parent folder
            is put first on ``PYTHONPATH`` and is the working directory, so
            ``-m LiverTumorSegLib`` resolves even where a launcher rewrites ``PYTHONPATH``.
        retry_on_cpu: start again with ``--device cpu`` if the GPU runs out of memory.
        popen: the process factory (``subprocess.Popen``); tests may inject a fake.
        grace_s: seconds between SIGTERM and the hard kill on cancel.
    """

    def __init__(self, command: Sequence[str], *, env: Optional[dict] = None, retry_on_cpu: bool = True,
                 popen: Callable = subprocess.Popen, grace_s: float = 5.0) -> None:
        self.command = list(command)
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LIB_PARENT), self.env.get("PYTHONPATH", "")) if p)
        # The child's messages are read as UTF-8: a piped Python on Windows would write its
        # stderr in the ANSI code page, garbling paths such as C:\Users\José.
        self.env["PYTHONIOENCODING"] = "utf-8"
        self.retry_on_cpu = retry_on_cpu
        self.popen = popen
        self.grace_s = grace_s
        self.state = RUNNING
        self.progress = 0.0
        self.message = ""
        self.error = ""
        self.warnings: List[str] = []
        self.outputs: dict = {}
        self.returncode: Optional[int] = None
        self._proc = None
        self._queue: "queue.Queue" = queue.Queue()
        self._readers: List[threading.Thread] = []
        self._stderr_tail: List[str] = []
        self._cancel_requested = False
        self._kill_at: Optional[float] = None
        self._retried = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "EngineRun":
        """Start the child process and its reader threads."""
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                      env=self.env, cwd=str(LIB_PARENT), text=True, encoding="utf-8", errors="replace")
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self._stderr_tail = []
        try:
            self._proc = self.popen(self.command, **kwargs)
        except OSError as exc:
            self._finish(FAILED, f"cannot start the segmentation process ({self.command[0]}): {exc}")
            return self
        self._readers = [self._reader(self._proc.stdout, parse_stdout_line),
                         self._reader(self._proc.stderr, parse_stderr_line)]
        return self

    def _reader(self, stream, parse) -> threading.Thread:
        def pump() -> None:
            for line in stream:
                self._queue.put(parse(line))
            stream.close()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def poll(self) -> List[RunEvent]:
        """Events since the last call; the last one is final once the run has ended."""
        events: List[RunEvent] = []
        if self.finished or self._proc is None:
            return events
        if self._kill_at is not None and time.monotonic() > self._kill_at:
            if self._proc.poll() is None or any(t.is_alive() for t in self._readers):
                _kill_tree(self._proc)  # the launcher may be gone while the Python it started lives on
            self._kill_at = None
        while True:
            try:
                events.append(self._handle(self._queue.get_nowait()))
            except queue.Empty:
                break
        if self._proc.poll() is not None and not any(t.is_alive() for t in self._readers):
            while not self._queue.empty():
                events.append(self._handle(self._queue.get_nowait()))
            events.extend(self._ended(self._proc.returncode))
        return events

    def _handle(self, event: RunEvent) -> RunEvent:
        if event.kind == "progress":
            self.progress, self.message = event.progress, event.message
        elif event.kind == "done":
            self.outputs = dict(event.data.get("outputs", {}))
            self.progress = 1.0
        elif event.kind == "warning":
            self.warnings.append(event.message)
        elif event.kind == "error":
            self.error = event.message
        if event.kind in ("log", "warning", "error"):
            self._stderr_tail = (self._stderr_tail + [event.message])[-20:]
        return event

    def _ended(self, code: int) -> List[RunEvent]:
        self.returncode = code
        if self._cancel_requested or code == EXIT_CANCELLED:
            return [self._finish(CANCELLED, "cancelled")]
        if code == 0 and self.outputs:
            return [self._finish(SUCCEEDED, "done")]
        tail = "\n".join(self._stderr_tail)
        if self.retry_on_cpu and not self._retried and any(m in tail for m in OOM_MARKERS) \
                and "cpu" not in self._device():
            return self._restart_on_cpu()
        reason = self.error or (self._stderr_tail[-1] if self._stderr_tail else f"exit code {code}")
        return [self._finish(FAILED, reason)]

    def _device(self) -> str:
        if "--device" in self.command:
            return self.command[self.command.index("--device") + 1]
        return "auto"

    def _restart_on_cpu(self) -> List[RunEvent]:
        self._retried = True
        if "--device" in self.command:
            self.command[self.command.index("--device") + 1] = "cpu"
        else:
            self.command += ["--device", "cpu"]
        text = "The GPU ran out of memory; running again on the CPU (slower)."
        self.warnings.append(text)
        self.progress, self.error = 0.0, ""
        self.start()
        return [RunEvent("warning", message=text)]

    def _finish(self, state: str, message: str) -> RunEvent:
        self.state = state
        if state == FAILED:
            self.error = message
        return RunEvent(state, progress=self.progress, message=message)

    # -- control ------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the child to stop: SIGTERM to its process group now; :meth:`poll` kills it
        if it is still alive ``grace_s`` later. Returns at once (the GUI never waits)."""
        if self.finished or self._proc is None or self._cancel_requested:
            return
        self._cancel_requested = True
        _terminate_tree(self._proc)
        self._kill_at = time.monotonic() + self.grace_s

    def stop(self, interval_s: float = 0.05) -> str:
        """Cancel, then block until the process tree is gone: ``grace_s`` for it to stop,
        then the hard kill, then a few seconds for it to die. For when nothing will poll
        again (module unload, application exit), so no child outlives its caller.
        Returns the final state (``running`` only if even the kill did not end it)."""
        if self.finished or self._proc is None:
            return self.state
        self.cancel()
        deadline = time.monotonic() + self.grace_s + 10.0
        while not self.finished and time.monotonic() < deadline:
            self.poll()  # sends the hard kill once the grace period is over
            time.sleep(interval_s)
        return self.state

    def wait(self, timeout: Optional[float] = None, on_event: Optional[Callable[[RunEvent], None]] = None,
             interval_s: float = 0.05) -> str:
        """Block until the run ends (tests, self-tests, scripts); returns the final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                if self._proc is not None and self._proc.poll() is None:
                    _kill_tree(self._proc)
                raise TimeoutError(f"the segmentation process did not finish within {timeout} s")
            time.sleep(interval_s)
        return self.state


def _terminate_tree(proc) -> None:
    if os.name == "nt":  # taskkill without /F only asks windows to close; the child has none
        _kill_tree(proc)
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (OSError, ProcessLookupError):
        proc.terminate()


def _kill_tree(proc) -> None:
    try:
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True, check=False,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # no console flash in Slicer
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        proc.kill()


def missing_dependencies() -> List[dict]:
    """What the engine needs that this Python lacks, without importing anything heavy.

    Returns a list of ``{"module", "pip", "bundled"}`` dicts, with ``"found"`` (the
    installed version) for a torch older than :data:`TORCH_MINIMUM`. ``bundled`` packages
    come with 3D Slicer (numpy, SimpleITK) and must never be pip-installed there: their
    absence means a broken installation. torch is the one a user is expected to install.
    """
    import importlib.metadata
    import importlib.util

    torch_pip = "torch>={}.{}".format(*TORCH_MINIMUM)
    needed = [("torch", torch_pip, False), ("numpy", "numpy", True), ("SimpleITK", "SimpleITK", True)]
    missing = [{"module": module, "pip": pip, "bundled": bundled}
               for module, pip, bundled in needed if importlib.util.find_spec(module) is None]
    if not any(item["module"] == "torch" for item in missing):
        try:
            found = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found is not None and release(found) < TORCH_MINIMUM:
            missing.insert(0, {"module": "torch", "pip": torch_pip, "bundled": False, "found": found})
    return missing
