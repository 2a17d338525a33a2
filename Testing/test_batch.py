"""``livertumorseg batch``: many CTs, the model loaded once, a folder per case, batch.csv."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from LiverTumorSegLib import cli
from LiverTumorSegLib.batch import SUMMARY_COLUMNS, plan_cases, read_list
from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.io import read_volume, write_volume

from .oracle import analytic_ct


def _rows(outdir: Path) -> list:
    with open(outdir / "batch.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cts(tmp_path_factory):
    """Two CTs of different sizes (``a.nrrd``, ``b.nii.gz``), a NIfTI cut short
    (``cut.nii.gz``) and an empty folder ``sub``."""
    root = tmp_path_factory.mktemp("batch-inputs")
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, root / "a.nrrd")
    other, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3), extent_mm=(140.0, 120.0, 111.0))
    write_volume(other, root / "b.nii.gz")
    whole = (root / "b.nii.gz").read_bytes()
    (root / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    (root / "sub").mkdir()
    return root


def _batch(*argv) -> int:
    return cli.main(["batch", *map(str, argv)])


def test_each_input_gets_its_own_folder_and_a_failure_does_not_stop_the_batch(cts, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    code = _batch(cts / "a.nrrd", cts / "cut.nii.gz", cts / "b.nii.gz", "-o", out,
                  "--model", tiny_model, "--progress", "none", "--no-preview")
    captured = capsys.readouterr()
    assert code == 2
    assert "1 of 3 case(s) failed: cut" in captured.err
    assert sorted(os.listdir(out)) == ["a", "b", "batch.csv"]  # nothing of the failed case
    rows = _rows(out)
    assert [(r["case"], r["status"]) for r in rows] == [("a", "done"), ("cut", "failed"), ("b", "done")]
    assert "truncated or corrupt" in rows[1]["error"] and rows[1]["liver_ml"] == ""
    assert rows[1]["input"] == str((cts / "cut.nii.gz").resolve())
    for row, name in ((rows[0], "a.nrrd"), (rows[2], "b.nii.gz")):
        document = json.loads((out / row["case"] / "stats.json").read_text(encoding="utf-8"))
        assert document["run"]["input"] == row["input"] == str((cts / name).resolve())
        assert float(row["liver_ml"]) == round(document["liver"]["volume_ml"], 1)
        assert int(row["lesions"]) == document["tumor"]["count"]
        assert row["warnings"] == " | ".join(document["run"]["warnings"])
        assert "preview.png" not in os.listdir(out / row["case"])
    # the same labels as segment gives for that input alone
    single = tmp_path / "single"
    assert cli.main(["segment", str(cts / "b.nii.gz"), "-o", str(single), "--model", str(tiny_model),
                     "--progress", "none", "--no-preview"]) == 0
    np.testing.assert_array_equal(read_volume(out / "b" / "segmentation.nii.gz").array,
                                  read_volume(single / "segmentation.nii.gz").array)
    for case, name in (("a", "a.nrrd"), ("b", "b.nii.gz")):  # each case got its own input's grid
        assert read_volume(out / case / "segmentation.nii.gz").shape_xyz == read_volume(cts / name).shape_xyz


def test_case_names(tmp_path):
    rels = ("x/p/ct.nii.gz", "y/q/liver_3.NII.GZ", "y/scan.mhd", "dicom/SERIES1", "notes.txt", "y/p/ct.nii.gz",
            "other/SERIES1", "y/p/CT.nrrd")
    for rel in rels:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"") if "." in path.name else path.mkdir()
    cases = plan_cases([tmp_path / r for r in rels[:5]])
    assert [c.name for c in cases] == ["ct", "liver_3", "scan", "SERIES1", "notes.txt"]
    # a link is named as given, and recorded as what it points to
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "y" / "scan.mhd")
    case, = plan_cases([tmp_path / "link.nii.gz"])
    assert case.name == "link" and case.input == (tmp_path / "y" / "scan.mhd").resolve()
    # two cases of one name (letter case aside) are refused, every clash named ...
    with pytest.raises(InputError) as refused:
        plan_cases([tmp_path / r for r in rels])
    message = str(refused.value)
    for a, b, name in (("y/p/ct.nii.gz", "x/p/ct.nii.gz", "ct"), ("other/SERIES1", "dicom/SERIES1", "SERIES1"),
                       ("y/p/CT.nrrd", "x/p/ct.nii.gz", "CT")):
        assert f"{tmp_path / a} and {tmp_path / b} would both be case {name!r}" in message
    assert "a name, a tab, then its path" in message
    # ... and names of their own settle it
    named = plan_cases([("p1", tmp_path / "x/p/ct.nii.gz", None), ("p2", tmp_path / "y/p/ct.nii.gz", None)])
    assert [c.name for c in named] == ["p1", "p2"]


def test_inputs_that_cannot_make_a_batch_are_refused_together_before_anything_runs(tmp_path, cts, tiny_model,
                                                                                   capsys):
    with pytest.raises(InputError, match="no inputs"):
        plan_cases([])
    (tmp_path / ".hidden.nii.gz").write_bytes(b"")
    (tmp_path / "batch.csv.nii").write_bytes(b"")
    with pytest.raises(InputError) as refused:
        plan_cases([tmp_path / ".hidden.nii.gz", tmp_path / "batch.csv.nii", ("a/b", cts / "a.nrrd", None),
                    ("", cts / "b.nii.gz", None)])
    for name in ("'.hidden'", "'batch.csv'", "'a/b'", "''"):
        assert f"would be named {name}, which cannot be" in str(refused.value)
    out = tmp_path / "out"
    code = _batch(cts / "a.nrrd", tmp_path / "missing.nii.gz", cts / "sub" / ".." / "a.nrrd",
                  "-o", out, "--model", tiny_model)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "missing.nii.gz: no such file or folder" in err and "given twice" in err
    assert "A list file (--list) can name each case" not in err  # the hint is for names that clash
    assert _batch("-o", out, "--model", tiny_model) == 2 and "no inputs" in capsys.readouterr().err
    # a case folder that is an input's folder: the results would land among the patient's files
    dicom = tmp_path / "P001"
    dicom.mkdir()
    (dicom / "1.dcm").write_bytes(b"")
    assert _batch(dicom, "-o", tmp_path, "--model", tiny_model) == 2
    assert f"case 'P001' would write into {dicom}, which holds the input {dicom}" in capsys.readouterr().err
    assert os.listdir(dicom) == ["1.dcm"]
    (tmp_path / "list.txt").write_text(f"P001\t{dicom / '1.dcm'}\n", encoding="utf-8")  # a file in it
    assert _batch("--list", tmp_path / "list.txt", "-o", tmp_path, "--model", tiny_model) == 2
    assert f"which holds the input {dicom / '1.dcm'}" in capsys.readouterr().err
    # the same folder by another path (a link here; another letter case on macOS or Windows)
    links = tmp_path / "links"
    links.mkdir()
    (links / "P001").symlink_to(dicom, target_is_directory=True)
    (links / "scans").symlink_to(cts, target_is_directory=True)
    (tmp_path / "list.txt").write_text(f"P001\t{dicom}\nscans\t{cts / 'a.nrrd'}\n", encoding="utf-8")
    assert _batch("--list", tmp_path / "list.txt", "-o", links, "--model", tiny_model) == 2
    err = capsys.readouterr().err
    assert f"case 'P001' would write into {links / 'P001'}, which holds the input {dicom}" in err
    assert f"case 'scans' would write into {links / 'scans'}, which holds the input {cts / 'a.nrrd'}" in err
    assert os.listdir(dicom) == ["1.dcm"]


def test_list_file(tmp_path, cts, tiny_model):
    listing = tmp_path / "lists" / "cases.txt"
    listing.parent.mkdir()
    (tmp_path / "lists" / "rel.nii.gz").write_bytes(b"")
    listing.write_text(f"# the cohort\n\n  rel.nii.gz  \npatient 7\t{cts / 'a.nrrd'}\n"
                       f"#{cts / 'cut.nii.gz'}\n#old\t{cts / 'cut.nii.gz'}\n", encoding="utf-8")
    assert read_list(listing) == [(None, tmp_path / "lists" / "rel.nii.gz", None), ("patient 7", cts / "a.nrrd", None)]
    with pytest.raises(InputError, match="cannot read the list of inputs"):
        read_list(tmp_path / "absent.txt")
    listing.write_text(f"b\t{cts / 'b.nii.gz'}\n", encoding="utf-8")
    out = tmp_path / "out"
    assert _batch(cts / "a.nrrd", "--list", listing, "-o", out, "--model", tiny_model, "--progress",
                  "none", "--no-surfaces", "--no-preview") == 0
    assert [(r["case"], r["status"]) for r in _rows(out)] == [("a", "done"), ("b", "done")]


def test_resume_keeps_what_the_same_settings_made_and_redoes_the_rest(cts, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    inputs = [cts / "a.nrrd", cts / "b.nii.gz"]
    options = ["-o", out, "--model", tiny_model, "--progress", "none", "--no-preview"]
    assert _batch(*inputs, *options) == 0
    stamp = {c: (out / c / "stats.json").stat().st_mtime_ns for c in ("a", "b")}
    capsys.readouterr()

    assert _batch(*inputs, *options, "--resume") == 0
    assert [r["status"] for r in _rows(out)] == ["done earlier", "done earlier"]
    assert {c: (out / c / "stats.json").stat().st_mtime_ns for c in stamp} == stamp
    first = _rows(out)[0]
    assert first["liver_ml"] != "" and first["seconds"] == ""

    (out / "b" / "stats.csv").unlink()  # a file of the earlier run gone: that case again
    assert _batch(*inputs, *options, "--resume") == 0
    assert [r["status"] for r in _rows(out)] == ["done earlier", "done"]
    assert "stats.csv of the earlier run is missing" in capsys.readouterr().out
    assert (out / "b" / "stats.csv").is_file()

    # another input under a case's name: that case again
    (tmp_path / "list.txt").write_text(f"a\t{cts / 'b.nii.gz'}\n", encoding="utf-8")
    assert _batch("--list", tmp_path / "list.txt", *options, "--resume") == 0
    assert [r["status"] for r in _rows(out)] == ["done"]
    assert f"input was '{cts / 'a.nrrd'}', not '{cts / 'b.nii.gz'}'" in capsys.readouterr().out
    assert _batch(*inputs, *options) == 0

    # other label settings, or other files asked for: every case again
    assert _batch(*inputs, *options, "--resume", "--min-lesion-ml", "0.5") == 0
    assert [r["status"] for r in _rows(out)] == ["done", "done"]
    assert "min_lesion_ml was 0.01, not 0.5" in capsys.readouterr().out
    assert _batch(*inputs[:1], "-o", out, "--model", tiny_model, "--progress", "none", "--resume",
                  "--min-lesion-ml", "0.5") == 0
    assert [r["status"] for r in _rows(out)] == ["done"]  # batch.csv lists this batch's cases
    assert (out / "a" / "preview.png").is_file()


def test_a_cancel_keeps_the_cases_done_and_lists_what_was_not(cts, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    args = cli.build_parser().parse_args(["batch", str(cts / "a.nrrd"), str(cts / "b.nii.gz"),
                                          str(cts / "sub" / ".." / "a.nrrd"),
                                          "-o", str(out), "--model", str(tiny_model), "--progress", "none"])
    with pytest.raises(InputError, match="given twice"):
        cli.run_batch(args, lambda: False)
    args.inputs = [cts / "a.nrrd", cts / "b.nii.gz", cts / "cut.nii.gz"]
    code = cli.run_batch(args, lambda: (out / "a" / "stats.json").exists())  # cancel once case 1 is in
    assert code == cli.EXIT_CANCELLED
    assert [(r["case"], r["status"]) for r in _rows(out)] == [("a", "done"), ("b", "cancelled"),
                                                              ("cut", "not run")]
    assert sorted(os.listdir(out)) == ["a", "batch.csv"]  # nothing of the cancelled case
    assert "cancelled during b; the 1 case(s) done are in" in capsys.readouterr().err


def test_a_batch_csv_not_written_by_a_batch_is_not_overwritten(cts, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "batch.csv").write_text("my,own,table\n", encoding="utf-8")
    assert _batch(cts / "a.nrrd", "-o", out, "--model", tiny_model) == 2
    assert "was not written by a batch run" in capsys.readouterr().err
    assert (out / "batch.csv").read_text(encoding="utf-8") == "my,own,table\n"
    assert os.listdir(out) == ["batch.csv"]
    assert list(SUMMARY_COLUMNS)[:2] == ["case", "status"]


def test_json_progress_is_events_only(cts, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    code = _batch(cts / "a.nrrd", cts / "cut.nii.gz", "-o", out, "--model", tiny_model, "--progress", "json",
                  "--no-surfaces", "--no-preview")
    assert code == 2
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # every line is JSON
    progress = [e["progress"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    first = [e["progress"] for e in events if e["event"] == "progress" and e["message"].startswith("[1/2]")]
    assert first and max(first) <= 0.5 + 1e-9  # each case its share
    cases = [e for e in events if e["event"] == "case"]
    assert [(e["case"], e["status"]) for e in cases] == [("a", "done"), ("cut", "failed")]
    assert cases[0]["summary"]["lesions"] >= 0 and "truncated" in cases[1]["error"]
    assert set(cases[0]["outputs"]) == {"segmentation", "stats_csv", "stats_json"}
    assert [(r["case"], r["status"]) for r in _rows(out)] == [("a", "done"), ("cut", "failed")]
    assert events[-1] == {"event": "done", "cases": 2, "failed": 1, "summary_csv": str(out.resolve() / "batch.csv"),
                          "total_s": events[-1]["total_s"]}


def test_a_signal_while_a_case_is_moved_in_counts_that_case_as_done(cts, tmp_path, tiny_model, monkeypatch, capsys):
    import LiverTumorSegLib.atomic as atomic

    out = tmp_path / "out"
    replace = os.replace

    def replace_once(a, b):  # as a signal handler does when SIGTERM lands while case a is moved in
        if os.path.dirname(b) == str(out / "a"):
            monkeypatch.setattr(atomic.os, "replace", replace)
            assert atomic.defer_interrupt()
        return replace(a, b)

    monkeypatch.setattr(atomic.os, "replace", replace_once)
    code = _batch(cts / "a.nrrd", cts / "b.nii.gz", "-o", out, "--model", tiny_model, "--progress", "none")
    assert code == cli.EXIT_CANCELLED
    rows = _rows(out)
    assert [(r["case"], r["status"]) for r in rows] == [("a", "done"), ("b", "not run")]
    document = json.loads((out / "a" / "stats.json").read_text(encoding="utf-8"))
    assert float(rows[0]["liver_ml"]) == round(document["liver"]["volume_ml"], 1)
    assert sorted(document["run"]["outputs"]) == sorted(os.listdir(out / "a"))
    assert "cancelled; the 1 case(s) done are in" in capsys.readouterr().err


def test_list_files_as_spreadsheets_and_editors_write_them(tmp_path, cts):
    listing = tmp_path / "cohort.txt"
    listing.write_bytes(b"\xef\xbb\xbf# exported\r\nP1\t" + str(cts / "a.nrrd").encode() + b"\r\n"
                        + b"P2\t" + str(cts / "b.nii.gz").encode() + b"\t1.2.3\r\n")
    assert read_list(listing) == [("P1", cts / "a.nrrd", None), ("P2", cts / "b.nii.gz", "1.2.3")]
    listing.write_text(f"P3\t\nP4\t{cts / 'a.nrrd'}\nP5\ta\tb\tc\nP6\t{cts / 'a.nrrd'}\t\n\t{cts / 'a.nrrd'}\n",
                       encoding="utf-8")
    with pytest.raises(InputError) as refused:
        read_list(listing)  # a row with an empty cell is not dropped without a word
    assert "line 1 ('P3')" in str(refused.value) and "line 3" in str(refused.value)
    assert "line 4" in str(refused.value) and "line 5" in str(refused.value) and "line 2" not in str(refused.value)
    # relative paths from the folder the list is in, as named, not where a link to it points
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "cohort.txt").symlink_to(tmp_path / "real" / "cohort.txt")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "cohort.txt").write_text("x.nii.gz\n", encoding="utf-8")
    assert read_list(tmp_path / "elsewhere" / "cohort.txt") == [(None, tmp_path / "elsewhere" / "x.nii.gz", None)]


def _two_series_study(folder: Path) -> None:
    """A DICOM study folder holding two CT series: 1.2.3.1 (arterial) and 1.2.3.2 (venous)."""
    from .test_io import _tall_volume, _write_dicom_series

    v = _tall_volume()
    _write_dicom_series(folder, v, series_uid="1.2.3.1", description="ARTERIAL")
    _write_dicom_series(folder, v.with_array((v.array + 7).astype(np.int16)), series_uid="1.2.3.2",
                        description="VENOUS")


def test_a_study_of_several_series_takes_the_uid_from_the_list(tmp_path, tiny_model, capsys):
    _two_series_study(tmp_path / "study")
    listing = tmp_path / "cohort.txt"
    listing.write_text("venous\tstudy\t1.2.3.2\n", encoding="utf-8")
    out = tmp_path / "out"
    code = _batch("--list", listing, "-o", out, "--model", tiny_model, "--progress", "none", "--allow-non-ct",
                  "--no-surfaces", "--no-preview")
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "venous" / "stats.json").read_text(encoding="utf-8"))["run"]["series"]["uid"] == "1.2.3.2"
    options = ["-o", out, "--model", tiny_model, "--progress", "none", "--allow-non-ct", "--no-surfaces",
               "--no-preview", "--resume"]
    assert _batch("--list", listing, *options) == 0 and _rows(out)[0]["status"] == "done earlier"
    listing.write_text("venous\tstudy\t1.2.3.1\n", encoding="utf-8")  # another series under that name
    assert _batch("--list", listing, *options) == 0 and _rows(out)[0]["status"] == "done"
    assert "the earlier run's series_requested was '1.2.3.2', not '1.2.3.1'" in capsys.readouterr().out
    assert json.loads((out / "venous" / "stats.json").read_text(encoding="utf-8"))["run"]["series"]["uid"] == "1.2.3.1"
    assert _batch(tmp_path / "study", "-o", tmp_path / "out2", "--model", tiny_model, "--progress", "none") == 2
    assert "(in a batch list file, a third column)" in _rows(tmp_path / "out2")[0]["error"]


def test_paths_that_would_fail_late_or_write_among_the_inputs_are_refused_first(tmp_path, cts, tiny_model, capsys):
    latin = tmp_path / os.fsdecode(b"caf\xe9.nii.gz")
    latin.write_bytes((cts / "b.nii.gz").read_bytes())
    (tmp_path / "hard.nrrd").hardlink_to(cts / "a.nrrd")
    with pytest.raises(InputError) as refused:
        plan_cases([latin, cts / "a.nrrd", tmp_path / "hard.nrrd", tmp_path, cts / "b.nii.gz"])
    message = str(refused.value)
    assert "not valid UTF-8" in message
    assert f"{tmp_path / 'hard.nrrd'}: given twice (also as {cts / 'a.nrrd'})" in message
    dicom = tmp_path / "P001"
    dicom.mkdir()
    (dicom / "1.dcm").write_bytes(b"")
    with pytest.raises(InputError, match="lies in the folder of the input"):
        plan_cases([dicom, dicom / "1.dcm"])
    for out in (dicom, dicom / "seg"):  # the output folder in a patient's DICOM folder
        assert _batch(dicom, "-o", out, "--model", tiny_model) == 2
        assert f"the output folder {out} lies in the input {dicom}" in capsys.readouterr().err
    assert os.listdir(dicom) == ["1.dcm"]


def test_resume_redoes_a_case_whose_input_changed_or_whose_record_is_unreadable(cts, tmp_path, tiny_model, capsys):
    work = tmp_path / "in"
    work.mkdir()
    for name in ("a.nrrd", "b.nii.gz"):
        (work / name).write_bytes((cts / name).read_bytes())
    out = tmp_path / "out"
    options = ["-o", out, "--model", tiny_model, "--progress", "none", "--no-preview", "--no-surfaces"]
    assert _batch(work / "a.nrrd", work / "b.nii.gz", *options) == 0
    before = json.loads((out / "a" / "stats.json").read_text(encoding="utf-8"))["run"]["input_fingerprint"]
    data = (work / "a.nrrd").read_bytes()
    (work / "a.nrrd").unlink()
    (work / "a.nrrd").write_bytes(data)  # the same path, written again (a re-export)
    document = json.loads((out / "b" / "stats.json").read_text(encoding="utf-8"))
    del document["liver"]
    (out / "b" / "stats.json").write_text(json.dumps(document), encoding="utf-8")
    capsys.readouterr()
    assert _batch(work / "a.nrrd", work / "b.nii.gz", *options, "--resume") == 0
    printed = capsys.readouterr().out
    assert "a: segmenting again: the input's files have changed since" in printed
    assert "b: segmenting again: its stats.json cannot be read" in printed
    assert [r["status"] for r in _rows(out)] == ["done", "done"]
    after = json.loads((out / "a" / "stats.json").read_text(encoding="utf-8"))["run"]["input_fingerprint"]
    assert after != before and len(after) == 64
    assert _batch(work / "a.nrrd", work / "b.nii.gz", *options, "--resume") == 0
    assert [r["status"] for r in _rows(out)] == ["done earlier", "done earlier"]


def test_a_closed_stdout_leaves_batch_csv_in_step_with_the_folders(cts, tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "out"

    def closed(text, flush=False):
        raise BrokenPipeError

    monkeypatch.setattr(cli, "_out", closed)  # the reader of stdout went away (| head) at the first line
    code = _batch(cts / "a.nrrd", cts / "b.nii.gz", "-o", out, "--model", tiny_model, "--progress", "none",
                  "--no-preview")
    assert code == cli.EXIT_BROKEN_PIPE
    assert [(r["case"], r["status"]) for r in _rows(out)] == [("a", "done"), ("b", "not run")]


def test_a_fault_in_one_case_is_recorded_and_the_batch_goes_on(cts, tmp_path, tiny_model, monkeypatch, capsys):
    from LiverTumorSegLib.pipeline import Segmenter

    segment = Segmenter.segment

    def faulty(self, ct, **kwargs):
        if ct.shape_xyz == read_volume(cts / "a.nrrd").shape_xyz:
            raise MemoryError("Unable to allocate 3.2 GiB")
        return segment(self, ct, **kwargs)

    monkeypatch.setattr(Segmenter, "segment", faulty)
    out = tmp_path / "out"
    code = _batch(cts / "a.nrrd", cts / "b.nii.gz", "-o", out, "--model", tiny_model, "--progress", "none",
                  "--no-preview")
    err = capsys.readouterr().err
    assert code == 2
    rows = _rows(out)
    assert [(r["case"], r["status"]) for r in rows] == [("a", "failed"), ("b", "done")]
    assert rows[0]["error"].startswith("internal error: MemoryError: Unable to allocate 3.2 GiB")
    assert "Traceback" in err and "1 of 2 case(s) failed: a" in err
    assert not (out / "a").exists()


def test_a_hangup_stops_a_batch_as_a_cancel_does(tmp_path):
    """SIGHUP (the SSH session dropped) used to kill the run outright, leaving a hidden
    staging folder; it now ends the batch like Ctrl-C, the cases done listed."""
    import signal
    import subprocess
    import sys
    import time

    from .helpers import REPO, make_tiny_model

    model = make_tiny_model(tmp_path / "m", widths=(8, 16), patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    for name, extent in (("small", (40.0, 40.0, 40.0)), ("large", (150.0, 130.0, 120.0))):
        ct, _ = analytic_ct((1.0, 1.0, 1.0), np.eye(3), extent_mm=extent)
        write_volume(ct, tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    # The engine leaves SIGHUP ignored where its launcher ignores it (nohup), so the
    # child must not inherit an ignored SIGHUP from however these tests were started: a
    # handler here becomes the default disposition in the child.
    before = signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "LiverTumorSegLib", "batch", str(tmp_path / "small.nii.gz"),
             str(tmp_path / "large.nii.gz"), "-o", str(out), "--model", str(model), "--progress", "json",
             "--batch-size", "1", "--overlap", "0.5", "--allow-non-ct"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        signal.signal(signal.SIGHUP, before)
    deadline = time.time() + 120
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["message"].startswith("[2/2] large: inference"):
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGHUP)
    # keep reading: a child blocked writing progress into a full pipe would never stop
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [(r["case"], r["status"]) for r in _rows(out)] == [("small", "done"), ("large", "cancelled")]
    assert sorted(os.listdir(out)) == ["batch.csv", "small"]  # no staging folder left


def test_one_study_twice_for_two_series_and_what_resume_compares(tmp_path, tiny_model, capsys):
    import shutil

    _two_series_study(tmp_path / "study")
    listing = tmp_path / "cohort.txt"
    listing.write_text("art\tstudy\t1.2.3.1\nven\tstudy\t1.2.3.2\n", encoding="utf-8")
    assert [c.series for c in plan_cases(read_list(listing))] == ["1.2.3.1", "1.2.3.2"]
    listing.write_text(f"nifti\t{tmp_path / 'study' / os.listdir(tmp_path / 'study')[0]}\t1.2.3.1\n",
                       encoding="utf-8")
    with pytest.raises(InputError, match=r"a series UID \(1.2.3.1\) is for a DICOM folder, and this is a file"):
        plan_cases(read_list(listing))
    for lines in ("a\tstudy\t1.2.3.1\nb\tstudy\t1.2.3.1\n", "a\tstudy\nb\tstudy\t1.2.3.2\n"):
        listing.write_text(lines, encoding="utf-8")
        with pytest.raises(InputError, match="given twice"):
            plan_cases(read_list(listing))
    listing.write_text("art\tstudy\t1.2.3.1\nven\tstudy\t1.2.3.2\n", encoding="utf-8")
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "out"
    options = ["-o", out, "--model", model, "--progress", "none", "--allow-non-ct", "--no-surfaces", "--no-preview"]
    assert _batch("--list", listing, *options) == 0
    run = json.loads((out / "art" / "stats.json").read_text(encoding="utf-8"))["run"]
    assert run["series"]["uid"] == run["series_requested"] == "1.2.3.1"
    assert run["engine_version"] and len(run["model_card_sha256"]) == 64
    capsys.readouterr()
    # the model's card edited (same weights): every case again
    card = json.loads((model / "model.json").read_text(encoding="utf-8"))
    card["intensity"]["window_hu"] = [-150.0, 250.0]  # another intensity window
    (model / "model.json").write_text(json.dumps(card), encoding="utf-8")
    assert _batch("--list", listing, *options, "--resume") == 0
    assert [r["status"] for r in _rows(out)] == ["done", "done"]
    assert "art: segmenting again: the earlier run's model_card_sha256 was" in capsys.readouterr().out
    # a study browsed in a file manager (a hidden file added) is still the same input
    (tmp_path / "study" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "study" / ".thumbnails").mkdir()
    (tmp_path / "study" / ".thumbnails" / "1.png").write_bytes(b"\0")
    assert _batch("--list", listing, *options, "--resume") == 0
    assert [r["status"] for r in _rows(out)] == ["done earlier", "done earlier"]


def test_resume_treats_a_stats_json_of_the_wrong_shape_as_unreadable(cts, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    options = ["-o", out, "--model", tiny_model, "--progress", "none", "--no-preview"]
    assert _batch(cts / "a.nrrd", cts / "b.nii.gz", *options) == 0
    for case, edit in (("a", lambda run: run.update(warnings=5)), ("b", lambda run: run["outputs"].append(None))):
        path = out / case / "stats.json"
        document = json.loads(path.read_text(encoding="utf-8"))
        edit(document["run"])
        path.write_text(json.dumps(document), encoding="utf-8")
    capsys.readouterr()
    assert _batch(cts / "a.nrrd", cts / "b.nii.gz", *options, "--resume") == 0
    assert capsys.readouterr().out.count("segmenting again: its stats.json cannot be read") == 2


def test_the_fingerprint_sees_a_file_written_again_with_its_size_and_time_restored(tmp_path):
    from LiverTumorSegLib.batch import input_fingerprint

    path = tmp_path / "ct.nii.gz"
    path.write_bytes(b"a" * 100)
    st = path.stat()
    before = input_fingerprint(path)
    assert input_fingerprint(path) == before  # reading changes nothing
    path.unlink()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p or rsync -a leave it
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert input_fingerprint(path) != before


def test_the_fingerprint_of_a_header_counts_the_file_that_holds_its_voxels(tmp_path, cts, tiny_model, capsys):
    """.mhd and .nhdr keep their voxels in another file: a scan replaced there (the
    header untouched) must be segmented again by --resume, not kept."""
    from LiverTumorSegLib.batch import data_files, input_fingerprint

    ct = read_volume(cts / "b.nii.gz")
    mhd, nhdr = tmp_path / "scan.mhd", tmp_path / "other.nhdr"
    write_volume(ct, mhd)
    write_volume(ct, nhdr)
    (raw,), (nhdr_raw,) = data_files(mhd), data_files(nhdr)
    assert raw.parent == tmp_path and raw.is_file() and raw.name.startswith("scan.")
    assert nhdr_raw.parent == tmp_path and nhdr_raw.is_file() and nhdr_raw.name.startswith("other.")
    assert data_files(cts / "b.nii.gz") == [] and data_files(cts / "a.nrrd") == []
    listed = tmp_path / "listed.mhd"
    listed.write_text("NDims = 3\nElementDataFile = LIST 2D\nslice0.raw\nslice1.raw\n")
    assert data_files(listed) == [tmp_path / "slice0.raw", tmp_path / "slice1.raw"]
    listed.write_text("NDims = 3\nElementDataFile = LOCAL\n")
    assert data_files(listed) == []

    options = ("-o", tmp_path / "out", "--model", tiny_model, "--no-surfaces", "--no-preview", "--progress", "none")
    assert _batch(mhd, *options) == 0
    before = input_fingerprint(mhd)
    flipped = read_volume(mhd)
    flipped.array[:] = flipped.array[:, :, ::-1]
    data = tmp_path / "flipped"
    data.mkdir()
    write_volume(flipped, data / "scan.mhd")
    (data / raw.name).replace(raw)  # the voxels replaced, the header as it was
    assert input_fingerprint(mhd) != before
    capsys.readouterr()
    assert _batch(mhd, *options, "--resume") == 0
    assert "segmenting again: the input's files have changed since" in capsys.readouterr().out


def test_a_list_saved_as_utf16_by_a_spreadsheet_is_read(tmp_path, cts):
    listing = tmp_path / "cohort.txt"
    listing.write_bytes(f"name\u00e9\t{cts / 'a.nrrd'}\r\n".encode("utf-16"))
    assert read_list(listing) == [("name\u00e9", cts / "a.nrrd", None)]
    listing.write_bytes(b"\xe9\t" + str(cts / "a.nrrd").encode())  # Latin-1: not guessed
    with pytest.raises(InputError, match="save it as UTF-8 text"):
        read_list(listing)


def test_a_folder_that_stops_taking_files_fails_each_case_by_name_and_the_batch_goes_on(cts, tmp_path, tiny_model,
                                                                                      capsys, monkeypatch):
    """A full disk after the first case: batch.csv cannot be rewritten, and neither can
    the later cases' files. Each case is still named as failed, the batch goes on, and
    the exit code says the list was not written."""
    import errno

    import LiverTumorSegLib.atomic as atomic

    real_replace, real_segment, full = os.replace, cli._segment_one, []

    def replace(source, destination):
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, destination)

    def segment_one(*args, **kwargs):
        if args[1] != cts / "a.nrrd":
            full.append(True)  # the disk fills up once the first case is in
        return real_segment(*args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(cli, "_segment_one", segment_one)
    out = tmp_path / "out"
    (tmp_path / "c.nii.gz").write_bytes((cts / "b.nii.gz").read_bytes())
    code = _batch(cts / "a.nrrd", cts / "b.nii.gz", tmp_path / "c.nii.gz", "-o", out, "--model", tiny_model,
                  "--progress", "none", "--no-preview", "--no-surfaces")
    captured = capsys.readouterr()
    assert code == 2
    for case in ("[2/3] b", "[3/3] c"):
        assert re.search(re.escape(case) + r": failed: cannot write .*No space left on device", captured.err)
    assert captured.err.count("the batch goes on, and the lines here are its record") == 1
    assert "2 of 3 case(s) failed: b, c (reasons above)" in captured.err
    assert f"cannot write {out / 'batch.csv'}" in captured.err and "the list of cases was not written" in captured.err
    assert "1 of 3 case(s) done" in captured.out and "batch.csv are in" not in captured.out
    assert [(r["case"], r["status"]) for r in _rows(out)] == [("a", "done"), ("b", "not run"), ("c", "not run")]


def test_resume_removes_the_staging_folder_a_killed_rerun_left_in_a_case_it_keeps(cts, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    options = ("-o", out, "--model", tiny_model, "--progress", "none", "--no-preview", "--no-surfaces")
    assert _batch(cts / "a.nrrd", *options) == 0
    left = out / "a" / ".a.partial-killed"  # what a SIGKILL during a second run's writing leaves
    left.mkdir()
    (left / "segmentation.nii.gz").write_bytes(b"half")
    assert _batch(cts / "a.nrrd", *options, "--resume") == 0
    assert "done earlier, kept" in capsys.readouterr().out
    assert not left.exists()


def test_a_case_folder_that_cannot_be_written_fails_before_its_work(cts, tmp_path, tiny_model, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_segment_one", lambda *args, **kwargs: calls.append(args[1]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file where the case folder goes")
    code = _batch(cts / "a.nrrd", "-o", out, "--model", tiny_model, "--progress", "none")
    assert code == 2 and calls == []
    assert f"a: failed: output path {out / 'a'} exists and is not a folder" in capsys.readouterr().err


def test_a_list_from_a_pipe_takes_relative_paths_from_the_current_folder(tmp_path, cts, monkeypatch):
    """`find ... | livertumorseg batch --list - ...` and `--list <(find ...)`: the list has
    no folder of its own, so its relative paths are the shell's, as find printed them."""
    import io as textio
    import threading

    monkeypatch.chdir(cts)
    monkeypatch.setattr("sys.stdin", textio.TextIOWrapper(textio.BytesIO(b"a.nrrd\nnamed\tb.nii.gz\n")))
    assert read_list(Path("-")) == [(None, cts / "a.nrrd", None), ("named", cts / "b.nii.gz", None)]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a.nrrd\n"))
    writer.start()
    assert read_list(fifo) == [(None, cts / "a.nrrd", None)]
    writer.join(10)
    (tmp_path / "list.txt").write_text("a.nrrd\n")  # a list file in a folder: from its folder, as before
    assert read_list(tmp_path / "list.txt") == [(None, tmp_path / "a.nrrd", None)]


def test_folders_without_inode_numbers_are_compared_by_path_alone(tmp_path, monkeypatch):
    """Some file systems give every file inode 0: that is no identity, and sibling
    folders must not be taken for one folder."""
    import LiverTumorSegLib.batch as batch

    for name in ("P1", "P2"):
        (tmp_path / name).mkdir()
    real_stat = os.stat

    def no_inodes(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        return os.stat_result((st.st_mode, 0, *tuple(st)[2:]))

    monkeypatch.setattr(batch.os, "stat", no_inodes)
    cases = [batch.Case("P1", tmp_path / "P1", None), batch.Case("P2", tmp_path / "P2", None)]
    batch.check_case_folders(cases, tmp_path / "out")  # nothing refused


def test_a_list_redirected_into_dev_stdin_takes_paths_from_the_current_folder(tmp_path, cts):
    import subprocess
    import sys

    (tmp_path / "list.txt").write_text("a.nrrd\n", encoding="utf-8")
    with open(tmp_path / "list.txt", "rb") as stdin:
        result = subprocess.run([sys.executable, "-c", "from LiverTumorSegLib.batch import read_list; "
                                 "print(read_list('/dev/stdin')[0][1])"], stdin=stdin, cwd=cts,
                                capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert result.stdout.strip() == str(cts / "a.nrrd"), result.stderr


def test_a_header_naming_an_impossible_data_file_does_not_stop_the_fingerprint(tmp_path):
    from LiverTumorSegLib.batch import data_files, input_fingerprint

    header = tmp_path / "bad.mhd"
    header.write_bytes(b"NDims = 3\nElementDataFile = a\x00b.raw\n")
    assert data_files(header) == []
    assert len(input_fingerprint(header)) == 64


# -- from a mutation review: the fingerprint, --resume's comparison, folder checks -------
def test_nrrd_datafile_key_without_a_space_and_mhd_slice_patterns_are_followed(tmp_path):
    """NRRD allows ``datafile:`` as well as ``data file:``; MetaImage may name its slices by
    a pattern. Either way the voxel files count in --resume's fingerprint."""
    from LiverTumorSegLib.batch import data_files, input_fingerprint

    nhdr = tmp_path / "a.nhdr"
    nhdr.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndatafile: a.raw\n")
    assert data_files(nhdr) == [tmp_path / "a.raw"]
    series = tmp_path / "series"
    series.mkdir()
    mhd = series / "s.mhd"
    mhd.write_text("NDims = 3\nElementDataFile = slice%03d.raw 0 1 1\n")
    for i in range(2):
        (series / f"slice{i:03d}.raw").write_bytes(b"\0" * 8)
    assert data_files(mhd) == [series / "slice000.raw", series / "slice001.raw"]
    before = input_fingerprint(mhd)
    (series / "slice001.raw").write_bytes(b"\1" * 9)  # a slice replaced, the header as it was
    assert input_fingerprint(mhd) != before


def test_the_fingerprint_tells_a_replaced_file_where_the_change_time_says_nothing(tmp_path, monkeypatch):
    """Some mounts (SMB, FUSE) report the modification time as the change time: a file
    replaced by a copy with its size and time kept (cp -p, rsync -a) differs only by its
    inode number."""
    from LiverTumorSegLib.batch import input_fingerprint

    real_stat = os.stat

    def ctime_is_mtime(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        return os.stat_result(list(st), {"st_mtime_ns": st.st_mtime_ns, "st_ctime_ns": st.st_mtime_ns,
                                         "st_atime_ns": st.st_atime_ns})

    path = tmp_path / "ct.nii.gz"
    path.write_bytes(b"a" * 100)
    os.link(path, tmp_path / "old-inode")  # keeps the old inode alive: the new file cannot reuse its number
    st = path.stat()
    monkeypatch.setattr(os, "stat", ctime_is_mtime)
    before = input_fingerprint(path)
    path.unlink()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert input_fingerprint(path) != before


def test_resume_compares_surface_format_and_preview_and_refuses_a_linked_record(cts, tmp_path, tiny_model):
    """An earlier run's OBJ surfaces are not what --mesh-format stl asks for, its preview
    not what --no-preview asks for, and a stats.json that is a link is not its record."""
    import shutil

    from LiverTumorSegLib.batch import RESUME_KEYS, earlier_result

    out = tmp_path / "out"
    assert _batch(cts / "a.nrrd", "-o", out, "--model", tiny_model, "--progress", "none",
                  "--mesh-format", "obj") == 0
    case = out / "a"
    run = json.loads((case / "stats.json").read_text(encoding="utf-8"))["run"]
    expected = {key: run.get(key) for key in RESUME_KEYS}
    assert earlier_result(case, expected, "obj", True)[0] is not None  # the same settings: kept
    assert earlier_result(case, expected, "stl", True) == (None, "the earlier run wrote other surface files")
    assert earlier_result(case, expected, "obj", False) == (None, "the earlier run wrote a preview")
    shutil.move(case / "stats.json", tmp_path / "stats.json")
    (case / "stats.json").symlink_to(tmp_path / "stats.json")
    assert earlier_result(case, expected, "obj", True) == (None, None)


def test_a_case_folder_holding_an_input_deeper_down_is_refused_without_inode_numbers(tmp_path, monkeypatch):
    """Where the file system gives no inode numbers, the path check alone must see an
    input two folders below a case folder."""
    import LiverTumorSegLib.batch as batch

    scan = tmp_path / "P001" / "2020" / "ct.nii.gz"
    scan.parent.mkdir(parents=True)
    scan.write_bytes(b"")
    real_stat = os.stat
    monkeypatch.setattr(batch.os, "stat", lambda p, *a, **k: os.stat_result(
        (real_stat(p, *a, **k).st_mode, 0, *tuple(real_stat(p, *a, **k))[2:])))
    with pytest.raises(InputError, match="would write into"):
        batch.check_case_folders([batch.Case("P001", scan, None)], tmp_path)
