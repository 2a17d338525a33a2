"""The ``livertumorseg`` command line.

Sub-commands: ``segment`` (a CT in, labels, statistics, surfaces and a preview out),
``batch`` (many CTs, the model loaded once, one output folder each and a ``batch.csv``;
see :mod:`.batch`), ``demo`` (segment the bundled sample CT with the bundled model),
``models`` (list models and the cache folder) and ``phantom`` (write a synthetic data set).

Exit codes: 0 success, 2 bad input or any other error the user can fix (one line on
stderr), 130 cancelled (Ctrl-C, SIGTERM or SIGHUP), 141 standard output closed by its reader
(``| head``), quietly, as other Unix tools do; outputs written before that stay.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

from . import __version__
from .atomic import InterruptedAfterwards, defer_interrupt
from .errors import Cancelled, LiverTumorSegError

EXIT_OK, EXIT_USER_ERROR, EXIT_CANCELLED, EXIT_BROKEN_PIPE = 0, 2, 130, 141


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: the run stops wherever it is, like Ctrl-C."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livertumorseg", description="Liver and liver-tumor segmentation of CT volumes.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a CT volume (NIfTI, NRRD, MHA/MHD or a DICOM folder)")
    seg.add_argument("input", type=Path, help="CT image file or DICOM series folder")
    seg.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if needed)")
    seg.add_argument("--series", default=None, metavar="UID",
                     help="the Series Instance UID to read, when the DICOM folder holds several CT series")
    _add_run_options(seg)

    demo = sub.add_parser("demo", help="segment the bundled sample CT with the bundled model")
    demo.add_argument("-o", "--output", type=Path, default=Path("livertumorseg-demo"), help="output folder (default: %(default)s)")
    _add_run_options(demo)

    batch = sub.add_parser("batch", help="segment many CTs, one output folder each, with a batch.csv of them all")
    batch.add_argument("inputs", type=Path, nargs="*", help="CT image files or DICOM series folders")
    batch.add_argument("--list", type=Path, default=None, metavar="FILE",
                       help="a file naming more inputs, one per line: PATH, or NAME<tab>PATH, or "
                            "NAME<tab>PATH<tab>SERIES_UID (relative paths from the file's folder; # comments); "
                            "- reads it from standard input")
    batch.add_argument("-o", "--output", type=Path, required=True,
                       help="output folder: one subfolder per case, and batch.csv")
    batch.add_argument("--resume", action="store_true",
                       help="keep a case's earlier results in the output folder when they came from the same "
                            "input, model and settings")
    _add_run_options(batch)

    sub.add_parser("models", help="list installed and registered models and the cache folder")

    ph = sub.add_parser("phantom", help="write a synthetic abdominal CT data set in MSD Task03 layout")
    ph.add_argument("output", type=Path, help="data set folder to create")
    ph.add_argument("--cases", type=int, default=10, help="training cases (default: %(default)s)")
    ph.add_argument("--test-cases", type=int, default=None, help="unlabelled test cases (default: cases // 5, at least 1)")
    ph.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    ph.add_argument("--preset", choices=("full", "coarse"), default="full",
                    help="full: 0.6-1 mm in-plane, 1-5 mm slices; coarse: ~3 mm, small and fast")
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="bundled or registered model name, or a model folder (default: the bundled model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--overlap", type=float, default=None, help="patch overlap fraction in [0, 1) (default: the model's)")
    p.add_argument("--fast", action="store_true", help="no patch overlap: faster, and it can cost accuracy (README)")
    p.add_argument("--no-surfaces", action="store_true", help="do not write liver.stl / tumor.stl")
    p.add_argument("--mesh-format", choices=("stl", "obj"), default="stl")
    p.add_argument("--no-preview", action="store_true", help="do not write preview.png")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="progress as a bar on stderr, JSON lines on stdout, or nothing")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--batch-size", type=_positive(int), default=2, help="patches per forward pass (default: 2)")
    from .boxes import WEIGHTINGS, WINDOW_GRIDS

    p.add_argument("--weighting", choices=WEIGHTINGS, default=WEIGHTINGS[0],
                   help="how overlapping windows blend: 'gaussian' (default; the centre of a window "
                        "counts most, as in nnU-Net) or 'constant' (plain averaging, MONAI's default)")

    p.add_argument("--window-grid", choices=WINDOW_GRIDS, default=WINDOW_GRIDS[0],
                   help="where the sliding windows sit: 'volume' (default) keeps the whole volume's "
                        "grid (MONAI's), reproducing an uncropped run inside the body; 'cover' takes "
                        "only as many of those windows as cover the body (faster where the volume's "
                        "last window covers nothing of the body the others miss); 'body' lays them on the body's box where that "
                        "needs fewer windows (fastest). With 'cover' and 'body' the labels can "
                        "differ slightly")
    p.add_argument("--min-lesion-ml", type=_positive(float, zero=True), default=0.01,
                   help="drop tumor components below this volume (mL; 0 keeps every one)")
    p.add_argument("--allow-non-ct", action="store_true", help="run even if the intensities do not look like CT HU")
    p.add_argument("--memory-budget-gb", type=_positive(float), default=None,
                   help="refuse volumes estimated to need more memory (default: 85%% of the free memory)")
    p.add_argument("--threads", type=_positive(int), default=None, help="CPU threads for PyTorch")


def _positive(kind, zero: bool = False):
    """An argparse type: a number of ``kind`` above 0 (or at least 0 with ``zero``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or value < 0 or (value == 0 and not zero):
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what} {'of 0 or more' if zero else 'above 0'}, not {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


#: Where writing the files starts in a segment run's progress: 1.0 means they are all in.
WRITE_START = 0.9


class _Reporter:
    """Progress as a tqdm bar (stderr), JSON lines (stdout) or nothing.

    The bar is created on the first report, and a failed run wipes it (see
    :meth:`close`), so an error is the last line on stderr.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bar = None
        self._last = -1

    def _make_bar(self) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self.mode = "lines"
            return
        self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def __call__(self, fraction: float, message: str) -> None:
        if self.mode == "json":
            self.event("progress", progress=round(fraction, 4), message=message)
            return
        if self.mode == "bar" and self.bar is None:
            self._make_bar()
        if self.bar is not None:
            self.bar.set_description_str(message[:40])
            self.bar.update(max(int(fraction * 1000) - self.bar.n, 0))
        elif self.mode == "lines" and int(fraction * 10) != self._last:
            self._last = int(fraction * 10)
            print(f"{fraction:4.0%} {message}", file=sys.stderr)

    def line(self, text: str, error: bool = False) -> None:
        """A line of its own: on stdout (stderr with ``error``) without breaking the bar;
        with JSON progress only ``error`` lines show, as stdout is for events then."""
        if self.mode == "json" and not error:
            return
        if error:
            write = lambda: print(text, file=sys.stderr)  # noqa: E731
        else:
            write = lambda: _out(text)  # noqa: E731
        if self.bar is None:
            write()
            return
        with self.bar.external_write_mode(file=sys.stderr if error else sys.stdout):
            write()

    def part(self, start: float, end: float) -> Callable[[float, str], None]:
        """A callback whose 0..1 is this job's ``start``..``end``."""
        return lambda fraction, message: self(start + (end - start) * fraction, message)

    def event(self, kind: str, **fields) -> None:
        if self.mode == "json":
            _out(json.dumps({"event": kind, **fields}), flush=True)

    def close(self, clear: bool = False) -> None:
        """End the bar; ``clear`` wipes its line (a failed run ends on its error alone)."""
        if self.bar is not None:
            if clear:
                self.bar.leave = False
            self.bar.close()
            self.bar = None


def _options(args):
    from .pipeline import SegmentOptions

    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise LiverTumorSegError(f"--overlap {args.overlap} must be in [0, 1)")
    if args.fast and args.overlap not in (None, 0.0):
        raise LiverTumorSegError(f"--fast means no patch overlap; it contradicts --overlap {args.overlap}: "
                                 "give one of them")
    return SegmentOptions(
        device=args.device, overlap=args.overlap, fast=args.fast, batch_size=args.batch_size,
        precision=args.precision, weighting=args.weighting, window_grid=args.window_grid,
        min_lesion_ml=args.min_lesion_ml,
        allow_non_ct=args.allow_non_ct, memory_budget_gb=args.memory_budget_gb, threads=args.threads,
    )


def _segment_one(segmenter, input_path: Path, series: Optional[str], output: Path, args,
                 progress: Callable[[float, str], None], cancel: Callable[[], bool],
                 fingerprint: Optional[str] = None) -> tuple:
    """Read one CT (``series``: the UID to read from a DICOM folder), segment it and
    write its outputs into ``output``: (result, written). ``progress`` hears the whole of
    it, 0 to 1; ``fingerprint``: the input's, when the caller has it already."""
    from .batch import input_fingerprint
    from .io import read_dicom_series, read_header, read_volume
    from .outputs import write_outputs
    from .preprocess import check_spacing

    header = read_header(input_path, with_direction=True)
    if header is not None:  # refuse before reading a volume that cannot fit
        check_spacing(header[1])  # a wrong spacing would be reported as a memory shortage
        segmenter.check_memory(*header)
    progress(0.0, "reading")
    t = time.perf_counter()
    provenance = {"input": str(Path(input_path).resolve()),  # as typed, it depends on where the run was
                  "input_fingerprint": fingerprint or input_fingerprint(input_path), "series_requested": series}
    if input_path.is_dir():  # a DICOM folder: also record which series was segmented
        ct, provenance["series"] = read_dicom_series(input_path, series)
    else:
        ct = read_volume(input_path, series_uid=series)
    read_s = time.perf_counter() - t
    result = segmenter.segment(ct, progress=lambda f, m: progress(f * WRITE_START, m), cancel=cancel)
    result.timings = {"read": read_s, **result.timings}
    t = time.perf_counter()
    written = write_outputs(result, ct, output, surfaces=not args.no_surfaces,
                            mesh_format=args.mesh_format, preview=not args.no_preview, extra=provenance,
                            progress=lambda f, m: progress(WRITE_START + (1.0 - WRITE_START) * f, m))
    result.timings["surfaces_and_write"] = time.perf_counter() - t
    return result, written


def _load(args, reporter):
    """The Segmenter of a run's options and model (a download reports its progress)."""
    from .model import resolve_model
    from .pipeline import Segmenter

    options = _options(args)
    model_folder = resolve_model(args.model, progress=reporter)
    reporter.close()
    return Segmenter(model_folder, options)


def run_segment(input_path: Path, args, cancel: Callable[[], bool]) -> int:
    from .atomic import check_writable_dir
    from .stats import summary, summary_text

    t0 = time.perf_counter()
    check_writable_dir(args.output)
    reporter = _Reporter(args.progress)
    try:
        segmenter = _load(args, reporter)
        result, written = _segment_one(segmenter, input_path, getattr(args, "series", None), args.output, args,
                                       reporter, cancel)
        args.written_to = args.output
    except BaseException:
        reporter.close(clear=True)  # the error that follows is the run's last line
        raise
    finally:
        reporter.close()
    for warning in result.info.get("warnings", []):  # also in stats.json (run.warnings)
        print(f"livertumorseg: warning: {warning}", file=sys.stderr)
    if args.progress == "json":
        reporter.event("done", outputs=written, summary=summary(result.stats),
                       timings_s={k: round(v, 3) for k, v in result.timings.items()},
                       total_s=round(time.perf_counter() - t0, 3))
    else:
        _out(summary_text(result.stats))
        _out(f"wrote {len(written)} files to {Path(args.output).resolve()}:")
        for path in written.values():
            _out(f"  {path}")
    return EXIT_OK


def run_batch(args, cancel: Callable[[], bool]) -> int:
    """Segment every input into OUTDIR/CASE/, going on past cases that fail; batch.csv
    lists them all. Exit 0 when every case is done, 2 when one failed, 130 on a cancel."""
    from .atomic import InterruptedAfterwards, check_writable_dir, sweep_stale_staging
    from .batch import (check_case_folders, check_summary_is_ours, earlier_result, input_fingerprint, plan_cases,
                        read_list, write_summary)
    from .errors import OutputError
    from .stats import summary, summary_text

    t0 = time.perf_counter()
    inputs = list(args.inputs) + (read_list(args.list) if args.list else [])
    cases = plan_cases(inputs)
    outdir = check_writable_dir(args.output)
    check_case_folders(cases, outdir)
    check_summary_is_ours(outdir)
    reporter = _Reporter(args.progress)
    n = len(cases)
    current = None
    unrecorded = []  # why batch.csv could not be written, while it cannot

    def record() -> None:
        """Rewrite batch.csv. A folder that stops taking files (a full disk) fails the
        cases from then on, each named on stderr; the list waits for the folder."""
        try:
            write_summary(outdir, cases)
        except OutputError as exc:
            if not unrecorded:
                reporter.line(f"livertumorseg: error: {exc}; the batch goes on, and the lines here are its "
                              "record until the list can be written", error=True)
            unrecorded[:] = [str(exc)]
        else:
            unrecorded.clear()

    try:
        segmenter = _load(args, reporter)
        expected = segmenter.label_settings()
        for i, case in enumerate(cases):
            current = case
            where = f"[{i + 1}/{n}] {case.name}"
            reason = fingerprint = None
            if args.resume:
                fingerprint = input_fingerprint(case.input)  # once: the run below records the same
                wanted = dict(expected, input=str(case.input), input_fingerprint=fingerprint)
                document, reason = earlier_result(outdir / case.name, dict(wanted, series_requested=case.series),
                                                  None if args.no_surfaces else args.mesh_format,
                                                  not args.no_preview)
                if document is not None:
                    case.status, case.summary = "done earlier", summary(document)
                    case.warnings = list(document["run"].get("warnings") or [])
                    sweep_stale_staging(outdir / case.name)  # a killed run of this case may have left one
                    record()  # before any printing: a closed stdout must not leave it behind
                    reporter.line(f"{where}: done earlier, kept: {summary_text(document)}")
                    reporter.event("case", case=case.name, index=i, status=case.status, summary=case.summary,
                                   warnings=case.warnings)
                    continue
                if reason:
                    reporter.line(f"{where}: segmenting again: {reason}")
            t = time.perf_counter()
            part = reporter.part(i / n, (i + 1) / n)
            try:
                try:
                    check_writable_dir(outdir / case.name)  # before the work, not after it
                    result, written = _segment_one(segmenter, case.input, case.series, outdir / case.name, args,
                                                   lambda f, m: part(f, f"{where}: {m}"), cancel, fingerprint)
                except InterruptedAfterwards:  # the case's files are all in; then the batch stops
                    case.status, case.seconds = "done", time.perf_counter() - t
                    try:
                        document = json.loads((outdir / case.name / "stats.json").read_text("utf-8"))
                        case.summary = summary(document)
                        case.warnings = list(document["run"].get("warnings") or [])
                    except (OSError, ValueError, KeyError, TypeError, AttributeError):
                        pass  # the row then lacks the figures; the case's own files have them
                    record()
                    reporter.event("case", case=case.name, index=i, status=case.status, summary=case.summary,
                                   warnings=case.warnings, seconds=round(case.seconds, 3), redone_because=reason)
                    raise
            except Cancelled:
                raise
            except Exception as exc:  # this case's input, memory, output, or a fault: the batch goes on
                case.status, case.seconds = "failed", time.perf_counter() - t
                case.error = str(exc) if isinstance(exc, LiverTumorSegError) else (
                    f"internal error: {type(exc).__name__}: {exc} (a fault of this program: please report it, "
                    "with the traceback on stderr)")
                record()
                if not isinstance(exc, LiverTumorSegError):
                    reporter.line("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip(),
                                  error=True)
                reporter.line(f"{where}: failed: {case.error}", error=True)
                reporter.event("case", case=case.name, index=i, status=case.status, error=case.error,
                               seconds=round(case.seconds, 3), redone_because=reason)
                continue
            case.status, case.seconds = "done", time.perf_counter() - t
            case.summary, case.warnings = summary(result.stats), list(result.info.get("warnings", []))
            record()
            reporter.line(f"{where}: {summary_text(result.stats)} ({case.seconds:.1f} s)")
            del result
            for warning in case.warnings:  # also in the case's stats.json and in batch.csv
                reporter.line(f"livertumorseg: warning: {case.name}: {warning}", error=True)
            reporter.event("case", case=case.name, index=i, status=case.status, summary=case.summary,
                           warnings=case.warnings, outputs=written, seconds=round(case.seconds, 3),
                           redone_because=reason)
        reporter(1.0, f"{n} case(s)")
    except (Cancelled, KeyboardInterrupt):
        reporter.close(clear=True)
        during = ""
        if current is not None and current.status == "not run":
            current.status, during = "cancelled", f" during {current.name}"
        finished = sum(c.status.startswith("done") for c in cases)
        if not finished and not any(c.status == "failed" for c in cases):
            raise  # nothing was written
        record()
        listed = "" if unrecorded else f", listed in {outdir / 'batch.csv'}"
        print(f"livertumorseg: cancelled{during}; the {finished} case(s) done are in {outdir}{listed}",
              file=sys.stderr)
        return EXIT_CANCELLED
    except BaseException:
        reporter.close(clear=True)
        raise
    finally:
        reporter.close()
    failed = [c.name for c in cases if c.status == "failed"]
    total = round(time.perf_counter() - t0, 3)
    if args.progress == "json":
        reporter.event("done", cases=n, failed=len(failed), total_s=total,
                       summary_csv=None if unrecorded else str(outdir / "batch.csv"))
    else:
        listing = "" if unrecorded else " and batch.csv"
        _out(f"{n - len(failed)} of {n} case(s) done in {total:.1f} s; their folders{listing} are in {outdir}")
    reasons = "reasons above" if unrecorded else f"reasons in {outdir / 'batch.csv'}"
    if failed:
        print(f"livertumorseg: error: {len(failed)} of {n} case(s) failed: {', '.join(failed)} ({reasons})",
              file=sys.stderr)
    if unrecorded:
        print(f"livertumorseg: error: {unrecorded[0]}; the list of cases was not written", file=sys.stderr)
    return EXIT_USER_ERROR if failed or unrecorded else EXIT_OK


def run_models() -> int:
    from .model import cache_dir, list_models

    entries = list_models()
    _out(f"cache folder: {cache_dir()} (set LIVERTUMORSEG_CACHE to change it)")
    if not entries:
        _out("no models installed or registered")
    for e in entries:
        where = str(e.path) if e.path else e.url
        _out(f"{e.name:24s} {e.source:10s} {where}")
        if e.description:
            _out(f"{'':24s} {e.description}")
    return EXIT_OK


def run_phantom(args) -> int:
    from .phantom import write_dataset

    if args.cases < 1:
        raise LiverTumorSegError("--cases must be at least 1")
    out = write_dataset(args.output, args.cases, args.seed, test_cases=args.test_cases, preset=args.preset)
    _out(f"wrote a {args.cases}-case phantom data set to {Path(out).resolve()}")
    return EXIT_OK


def _out(text: str, flush: bool = False) -> None:
    """Print to stdout; a failing stdout (a full disk behind a redirection) becomes a
    one-line error. A closed pipe is left to :func:`main`, which ends quietly."""
    if sys.stdout is None:  # stdout closed (>&-) or absent (pythonw)
        return
    try:
        print(text, flush=flush)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise LiverTumorSegError(f"cannot write to standard output: {exc}") from None


def _flush_stdout(code: int) -> int:
    """Flush stdout now, so a closed pipe shows here rather than in Python's flush at exit."""
    if sys.stdout is None:
        return code
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:  # the outputs are written; only the summary could not be shown
        print(f"livertumorseg: error: cannot write to standard output: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return code


def _run_command(args, cancel: Callable[[], bool]) -> int:
    if args.command == "segment":
        return run_segment(args.input, args, cancel)
    if args.command == "demo":
        from .samples import sample_ct_path

        return run_segment(sample_ct_path(), args, cancel)
    if args.command == "batch":
        return run_batch(args, cancel)
    if args.command == "models":
        return run_models()
    return run_phantom(args)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    stop = {"requested": False}

    def on_signal(signum, frame):  # SIGTERM (e.g. Cancel in Slicer), SIGHUP or Ctrl-C ends the run cleanly
        stop["requested"] = True
        if defer_interrupt():
            return  # outputs are being moved in: raised once they all are
        # As Python does for SIGINT: not an Exception, which a broad handler on the line the
        # signal lands on (torch's load_state_dict has one) would report as another error.
        raise Terminated("stopped by signal")

    # A signal a launcher set to be ignored (SIGINT of a background job) stays ignored.
    # SIGHUP: the terminal or SSH session went away (under nohup it is ignored, and stays so).
    handled = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, on_signal) for sig in handled if signal.getsignal(sig) is not signal.SIG_IGN}
    args.written_to = None  # set once a run's outputs are all in place
    try:
        code = _run_command(args, lambda: stop["requested"])
        return _flush_stdout(code)
    except (Cancelled, KeyboardInterrupt) as exc:  # Terminated is a KeyboardInterrupt
        if args.written_to is not None or isinstance(exc, InterruptedAfterwards):
            where = getattr(args, "output", None)
            where = f" to {Path(where).resolve()}" if where else ""
            print(f"livertumorseg: cancelled after every output was written{where}", file=sys.stderr)
        else:
            print("livertumorseg: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except LiverTumorSegError as exc:
        print(f"livertumorseg: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # the reader of stdout went away; Python's exit flush must not fail too
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no real file descriptor behind sys.stdout
            pass
        return EXIT_BROKEN_PIPE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
