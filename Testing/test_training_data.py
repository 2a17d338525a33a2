"""Training data: dataset errors name the case, the split, the cache and its rebuilds,
and the TorchIO bridge keeps the engine's (z, y, x) axis order."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "Training") not in sys.path:
    sys.path.insert(0, str(REPO / "Training"))

pytest.importorskip("torchio", reason="the training extras (pip install .[train]) are not installed")

from livertumorseg_training.cache import build_cache, read_manifest  # noqa: E402
from livertumorseg_training.config import load_config  # noqa: E402
from livertumorseg_training.dataset import Case, split_cases, training_cases  # noqa: E402
from livertumorseg_training.errors import ConfigError, DatasetError  # noqa: E402


def _write(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0)) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def make_dataset(root: Path, n: int = 3, shape=(12, 16, 20), suffix: str = ".nii.gz",
                 spacing=(2.0, 2.0, 3.0)) -> Path:
    """A tiny MSD-layout data set: air around a 'liver' box with a 'tumor' inside."""
    entries = []
    for i in range(n):
        ct = np.full(shape, -1000, dtype=np.int16)
        ct[2:-2, 3:-3, 3:-3] = 50
        label = np.zeros(shape, dtype=np.uint8)
        label[4:-4, 5:-5, 5:-5] = 1
        label[5:7, 6:8, 6:8] = 2
        _write(root / "imagesTr" / f"liver_{i}{suffix}", ct, spacing)
        _write(root / "labelsTr" / f"liver_{i}{suffix}", label, spacing)
        entries.append({"image": f"./imagesTr/liver_{i}{suffix}", "label": f"./labelsTr/liver_{i}{suffix}"})
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "training": entries, "test": []}))
    return root


def _config(**data):
    config = load_config("smoke")
    config["data"].update(data)
    config["data"]["cache_workers"] = 1
    return config


# -- dataset errors ---------------------------------------------------------------------
def test_missing_dataset_json(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        training_cases(tmp_path)


def test_listed_file_missing_names_the_case(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case liver_1 .*label file .* is missing"):
        training_cases(root)


def test_every_case_with_missing_files_is_listed_at_once(tmp_path):
    root = make_dataset(tmp_path / "d", n=4)
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    (root / "imagesTr" / "liver_3.nii.gz").unlink()
    (root / "labelsTr" / "liver_3.nii.gz").unlink()
    with pytest.raises(DatasetError, match="2 case") as refused:
        training_cases(root)
    message = str(refused.value)
    assert "case liver_1 (training entry 1): its label file" in message
    assert "case liver_3 (training entry 3): its image file" in message and "are missing" in message
    assert "liver_0" not in message and "liver_2" not in message


def test_a_fold_without_the_number_of_folds_is_refused(tmp_path):
    from livertumorseg_training.run import build_parser, resolve_config

    with pytest.raises(ConfigError, match="--fold 2 needs --folds"):
        resolve_config(build_parser().parse_args(["--data-dir", str(tmp_path), "--config", "smoke", "--fold", "2"]))
    config = resolve_config(build_parser().parse_args(["--data-dir", str(tmp_path), "--config", "smoke",
                                                       "--folds", "3", "--fold", "2"]))
    assert config["data"]["folds"] == 3 and config["data"]["fold"] == 2


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=fast", "optimizer.lr must be a number, not 'fast'"),
    ("trainer.max_epochs=abc", "trainer.max_epochs must be a whole number, not 'abc'"),
    ("model.widths=[4, 8, x]", r"model.widths must be a list of whole numbers, not \[4, 8, 'x'\]"),
    ("augmentation.flip=1", "augmentation.flip must be true or false, not 1"),
    ("loss.class_weights=[1, a]", "loss.class_weights must be a list of numbers"),
    ("trainer=5", r"trainer must be a section \(a mapping of keys\), not 5"),
    ("sampling.label_probabilities={0: 1, 1: x}", "sampling.label_probabilities must map each label to a number"),
])
def test_a_value_of_the_wrong_kind_is_refused_before_anything_is_written(tmp_path, override, message):
    """It used to pass, write config.yaml and logs/, then fail in the optimizer with a
    traceback, after which the same command with the value fixed was refused (a used
    run folder)."""
    from livertumorseg_training.run import build_parser, resolve_config

    with pytest.raises(ConfigError, match=message):
        resolve_config(build_parser().parse_args(["--data-dir", str(tmp_path), "--config", "smoke",
                                                  "--out", str(tmp_path / "run"), override]))
    assert not (tmp_path / "run").exists()


def test_numbers_yaml_reads_as_text_and_lightnings_own_kinds_are_taken():
    config = load_config("smoke", ["optimizer.lr=1e-3", "trainer.devices=[0, 1]", "trainer.precision=16",
                                   "trainer.deterministic=true", "loss.class_weights=[1, 1, 3]", "data.folds=5",
                                   "augmentation.affine_scales=null"])  # null: that augmentation off
    assert config["augmentation"]["affine_scales"] is None
    assert config["optimizer"]["lr"] == 0.001 and isinstance(config["optimizer"]["lr"], float)
    assert config["trainer"]["devices"] == [0, 1] and config["trainer"]["precision"] == 16
    assert config["trainer"]["deterministic"] is True and config["loss"]["class_weights"] == [1, 1, 3]


def test_the_learning_rate_schedule_takes_the_resumed_runs_length():
    """Resumed with more epochs, the schedule follows the new length from the saved step."""
    import torch

    from livertumorseg_training.module import LRFactor, keep_new_schedule_length

    def scheduler(total):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor("cosine", total, 2, 0.0))

    first = scheduler(16)
    for _ in range(16):
        first.optimizer.step()
        first.step()
    assert first.get_last_lr()[0] == pytest.approx(0.0)  # the end of the first run's schedule
    checkpoint = {"lr_schedulers": [first.state_dict()]}
    keep_new_schedule_length(checkpoint)
    resumed = scheduler(32)
    resumed.load_state_dict(checkpoint["lr_schedulers"][0])
    assert resumed.last_epoch == 16 and resumed.lr_lambdas[0].total == 32
    resumed.optimizer.step()
    resumed.step()  # the first step after resuming sets the next step's rate from the new length
    assert resumed.get_last_lr()[0] == pytest.approx(LRFactor("cosine", 32, 2, 0.0)(17))
    assert resumed.get_last_lr()[0] > 0.4
    plain = scheduler(16)
    plain.load_state_dict(first.state_dict())  # what happened before: the old length came back
    assert plain.lr_lambdas[0].total == 16


def test_run_folder_rules(tmp_path, monkeypatch):
    from livertumorseg_training.run import RUN_DIR_ENV, build_parser, refuse_a_used_run_dir, run_dir_for

    run = tmp_path / "run"
    refuse_a_used_run_dir(run)  # a folder still to be made
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "events.out.tfevents.1.host").write_text("")
    with pytest.raises(ConfigError, match="no checkpoints/last.ckpt to resume from"):
        refuse_a_used_run_dir(run)  # a crash before the first checkpoint: --resume would not help
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_text("")
    with pytest.raises(ConfigError, match="continue it with --resume"):
        refuse_a_used_run_dir(run)
    (run / "hpc_ckpt_1.ckpt").write_text("")
    with pytest.raises(ConfigError):
        refuse_a_used_run_dir(run)  # an old requeue checkpoint alone does not make this a requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    refuse_a_used_run_dir(run)  # a SLURM requeue: Lightning resumes from its own checkpoint

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun, no --out: every rank would name its own folder
    args = build_parser().parse_args(["--data-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="give --out"):
        run_dir_for(args, {"name": "smoke"})
    args = build_parser().parse_args(["--data-dir", str(tmp_path), "--out", str(run)])
    assert run_dir_for(args, {"name": "smoke"}) == run.resolve()


def test_demo_recipe_is_the_bundled_models():
    """`--config demo` resolves to the recipe stored in the bundled card; keys added to
    the training code since then must be set to what their absence meant (off)."""
    recipe = json.loads((REPO / "LiverTumorSegLib" / "models" / "demo-phantom" / "model.json").read_text())
    stored = recipe["provenance"]["recipe"]
    current = json.loads(json.dumps(load_config("demo")))  # the card's JSON form (string keys)
    differences = []

    def compare(now, then, where):
        if isinstance(now, dict) and isinstance(then, dict):
            for key in sorted(set(now) | set(then)):
                if key not in then and now.get(key) in (None, False):
                    continue  # added later; off, as its absence meant
                compare(now.get(key, "<absent>"), then.get(key, "<absent>"), f"{where}.{key}")
        elif now != then:
            differences.append(f"{where}: {now!r} now, {then!r} in the card")

    compare(current, stored, "recipe")
    assert differences == []


def test_entries_without_label_are_skipped(tmp_path):
    root = make_dataset(tmp_path / "d")
    data = json.loads((root / "dataset.json").read_text())
    data["training"].append({"image": "./imagesTr/liver_0.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(data))
    assert [c.case_id for c in training_cases(root)] == ["liver_0", "liver_1", "liver_2"]


def test_shape_mismatch_names_the_case(tmp_path):
    root = make_dataset(tmp_path / "d")
    _write(root / "labelsTr" / "liver_2.nii.gz", np.zeros((12, 16, 19), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"case liver_2: image and label shapes differ"):
        build_cache(training_cases(root), _config(), tmp_path / "cache", workers=1, progress=False)


def test_geometry_mismatch_names_the_case(tmp_path):
    root = make_dataset(tmp_path / "d")
    label = np.zeros((12, 16, 20), dtype=np.uint8)
    _write(root / "labelsTr" / "liver_0.nii.gz", label, origin=(5.0, 0.0, 0.0))
    with pytest.raises(DatasetError, match=r"case liver_0: image and label geometry differ"):
        build_cache(training_cases(root), _config(), tmp_path / "cache", workers=1, progress=False)


def test_label_values_outside_0_1_2(tmp_path):
    root = make_dataset(tmp_path / "d")
    label = np.zeros((12, 16, 20), dtype=np.uint8)
    label[3, 3, 3] = 5
    _write(root / "labelsTr" / "liver_1.nii.gz", label)
    with pytest.raises(DatasetError, match=r"case liver_1: label values 5 are outside \{0, 1, 2\}"):
        build_cache(training_cases(root), _config(), tmp_path / "cache", workers=1, progress=False)


def test_empty_training_set(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [], "test": []}))
    with pytest.raises(DatasetError, match="training set is empty"):
        split_cases(training_cases(tmp_path))
    one = [Case("only", tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")]
    with pytest.raises(DatasetError, match="training set is empty"):
        split_cases(one)


# -- split and recipes -----------------------------------------------------------------
def test_sequential_split_and_folds():
    cases = [Case(f"c{i}", Path(f"{i}"), Path(f"{i}")) for i in range(20)]
    train, val = split_cases(cases, 0.1)
    assert [c.case_id for c in val] == ["c18", "c19"] and len(train) == 18
    folds = [split_cases(cases, 0.1, folds=5, fold=k)[1] for k in range(5)]
    assert [c.case_id for c in folds[1]] == ["c4", "c5", "c6", "c7"]
    assert sorted(c.case_id for fold in folds for c in fold) == sorted(c.case_id for c in cases)


def test_recipes_load_and_typos_are_refused():
    seed = load_config("seed")
    assert seed["sampling"]["patch_size"] == [96, 96, 96] and seed["trainer"]["batch_size"] == 2
    assert seed["intensity"]["mode"] == "minmax" and seed["loss"]["name"] == "ce"
    assert seed["sampling"]["label_probabilities"] == {0: 0.2, 1: 0.3, 2: 0.5}
    assert seed["checkpoint"]["save_top_k"] == 10 and seed["sampling"]["num_workers"] == 4
    for name in ("default", "smoke", "demo"):
        load_config(name)
    assert load_config("smoke", ["trainer.max_epochs=5"])["trainer"]["max_epochs"] == 5
    with pytest.raises(ConfigError, match="unknown"):
        load_config("smoke", ["trainer.max_epoch=5"])
    with pytest.raises(ConfigError, match="multiple of"):
        load_config("smoke", ["sampling.patch_size=[30,32,32]"])


# -- cache ------------------------------------------------------------------------------
def test_cache_is_memory_mappable_and_rebuilt_when_parameters_change(tmp_path):
    root = make_dataset(tmp_path / "d")
    cases = training_cases(root)
    cache = tmp_path / "cache"
    entries = build_cache(cases, _config(), cache, workers=1, progress=False)
    ct = np.load(cache / entries["liver_0"]["files"]["ct"], mmap_mode="r")
    label = np.load(cache / entries["liver_0"]["files"]["label"], mmap_mode="r")
    assert isinstance(ct, np.memmap) and ct.dtype == np.int16 and label.dtype == np.uint8
    assert ct.shape == label.shape and set(np.unique(label)) <= {0, 1, 2}
    assert entries["liver_0"]["spacing_mm"] == [4.0, 4.0, 4.0]
    stamp = (cache / entries["liver_0"]["files"]["ct"]).stat().st_mtime_ns

    build_cache(cases, _config(), cache, workers=1, progress=False)
    assert (cache / entries["liver_0"]["files"]["ct"]).stat().st_mtime_ns == stamp, "unchanged: no rebuild"

    with pytest.raises(DatasetError, match=r"other preprocessing \(spacing_mm differ\).*another run"):
        build_cache(cases, _config(spacing_mm=[2.0, 2.0, 2.0]), cache, workers=1, progress=False,
                    rebuild_stale=False)  # a --cache-dir folder: another run may be reading it
    assert (cache / entries["liver_0"]["files"]["ct"]).stat().st_mtime_ns == stamp, "refused: nothing touched"

    rebuilt = build_cache(cases, _config(spacing_mm=[2.0, 2.0, 2.0]), cache, workers=1, progress=False)
    assert read_manifest(cache)["params"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert rebuilt["liver_0"]["shape_zyx"] != entries["liver_0"]["shape_zyx"]


def test_a_read_only_data_folder_names_cache_dir_instead_of_a_traceback(tmp_path, monkeypatch):
    """Shared data sets are often read-only; the default cache lies inside them."""
    import errno
    from pathlib import Path

    root = make_dataset(tmp_path / "d")
    cache = root / ".livertumorseg-cache"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == cache:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(DatasetError, match=r"Read-only file system; pass --cache-dir DIR on a writable disk"):
        build_cache(training_cases(root), _config(), cache, workers=1, progress=False)


def _read_only(monkeypatch, root: Path) -> None:
    """Make ``root`` behave as read-only storage does (tests may run as root, whom chmod
    does not stop): no file or folder can be created, written or removed under it."""
    import errno
    import os
    import shutil

    top = os.path.abspath(root)

    def inside(path) -> bool:
        path = os.path.abspath(os.fspath(path))
        return path == top or path.startswith(top + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_access, real_open, real_mkdir, real_rmtree = os.access, os.open, Path.mkdir, shutil.rmtree
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and inside(path)
                        else real_access(path, mode, **kw))
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **kw: refuse(path) if flags & writing and inside(path)
                        else real_open(path, flags, *a, **kw))
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **kw: refuse(self) if inside(self) and not self.is_dir()
                        else real_mkdir(self, *a, **kw))
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **kw: refuse(path) if inside(path)
                        else real_rmtree(path, *a, **kw))


def test_a_complete_cache_on_read_only_storage_is_used_and_a_stale_one_names_cache_dir(tmp_path, monkeypatch):
    """A cache built once beside a shared, read-only data set only has to be read (the
    write check refused it); one that needs rebuilding there is one line, not the
    PermissionError traceback of deleting it."""
    root = make_dataset(tmp_path / "d")
    cache = root / ".livertumorseg-cache" / "x"
    cases = training_cases(root)
    built = build_cache(cases, _config(), cache, workers=1, progress=False)
    _read_only(monkeypatch, root)
    assert build_cache(cases, _config(), cache, workers=1, progress=False) == built
    with pytest.raises(DatasetError, match=r"cannot write the preprocessed cache in .*Read-only file system; "
                                           r"pass --cache-dir DIR on a writable disk"):
        build_cache(cases, _config(spacing_mm=[2.0, 2.0, 2.0]), cache, workers=1, progress=False)
    assert read_manifest(cache)["cases"].keys() == built.keys()  # the old cache is still there


def test_cache_is_rebuilt_when_the_preprocessing_code_changes(tmp_path, monkeypatch):
    from livertumorseg_training import cache as cache_module

    root = make_dataset(tmp_path / "d")
    cases = training_cases(root)
    entries = build_cache(cases, _config(), tmp_path / "cache", workers=1, progress=False)
    ct_file = tmp_path / "cache" / entries["liver_0"]["files"]["ct"]
    assert read_manifest(tmp_path / "cache")["params"]["code"] == cache_module.code_fingerprint()
    stamp = ct_file.stat().st_mtime_ns
    monkeypatch.setattr(cache_module, "code_fingerprint", lambda: "edited")  # e.g. to_model_grid changed
    build_cache(cases, _config(), tmp_path / "cache", workers=1, progress=False)
    assert read_manifest(tmp_path / "cache")["params"]["code"] == "edited"
    assert ct_file.stat().st_mtime_ns != stamp


def test_other_preprocessing_gets_its_own_default_cache_and_leaves_the_old_one_alone(tmp_path, monkeypatch, capsys):
    """A run from changed code (a git pull between two folds) used to rebuild the default
    cache in place, deleting the arrays under the run still reading it."""
    from livertumorseg_training import cache as cache_module
    from livertumorseg_training.cache import default_cache_dir, other_caches
    from livertumorseg_training.data import LiverDataModule

    root = make_dataset(tmp_path / "d")
    first = LiverDataModule(root, _config())
    first.prepare_data()
    assert first.cache_dir.parent == root.resolve() / ".livertumorseg-cache"
    assert first.cache_dir.name.startswith("4x4x4mm-LPS-") and len(first.cache_dir.name) == len("4x4x4mm-LPS-") + 8
    arrays = sorted(first.cache_dir.glob("*.npy"))
    stamps = [p.stat().st_mtime_ns for p in arrays]
    assert default_cache_dir(root, _config()) == first.cache_dir and "note:" not in capsys.readouterr().err

    monkeypatch.setattr(cache_module, "code_fingerprint", lambda: "edited")  # e.g. to_model_grid changed
    second = LiverDataModule(root, _config())
    assert second.cache_dir != first.cache_dir and second.cache_dir.name.startswith("4x4x4mm-LPS-")
    second.prepare_data()
    assert read_manifest(second.cache_dir)["params"]["code"] == "edited"
    assert [p.stat().st_mtime_ns for p in arrays] == stamps  # the first run's cache untouched
    assert read_manifest(first.cache_dir)["params"]["code"] == cache_module._CODE_FINGERPRINT[0]
    assert other_caches(second.cache_dir) == [first.cache_dir]
    assert f"1 cache(s) of other preprocessing (other settings or code) lie beside {second.cache_dir.name}" in \
        capsys.readouterr().err
    assert default_cache_dir(root, _config(spacing_mm=[2.0, 2.0, 2.0])).name.startswith("2x2x2mm-LPS-")


def test_the_code_fingerprint_describes_the_code_imported_not_the_files_edited_since(tmp_path, monkeypatch):
    from livertumorseg_training import cache as cache_module

    before = cache_module.code_fingerprint()
    source = tmp_path / "io.py"
    source.write_text("# edited after import\n", encoding="utf-8")
    import LiverTumorSegLib.io as io_module

    monkeypatch.setattr(io_module, "__file__", str(source))  # the file on disk changed (a git pull)
    assert cache_module.code_fingerprint() == before
    monkeypatch.setattr(cache_module, "_CODE_FINGERPRINT", [])
    assert cache_module.code_fingerprint() != before  # a new process would see the new code


def test_cache_rebuilds_a_case_whose_source_changed(tmp_path):
    root = make_dataset(tmp_path / "d")
    cache = tmp_path / "cache"
    first = build_cache(training_cases(root), _config(), cache, workers=1, progress=False)
    label = np.zeros((12, 16, 20), dtype=np.uint8)
    _write(root / "labelsTr" / "liver_2.nii.gz", label)
    second = build_cache(training_cases(root), _config(), cache, workers=1, progress=False)
    assert first["liver_2"]["label_voxels"][1] > 0 and second["liver_2"]["label_voxels"][1] == 0
    assert first["liver_0"] == second["liver_0"]
    assert read_manifest(cache)["cases"]["liver_2"] == second["liver_2"]  # recorded: not rebuilt every time
    stamp = (cache / "liver_2_label.npy").stat().st_mtime_ns
    build_cache(training_cases(root), _config(), cache, workers=1, progress=False)
    assert (cache / "liver_2_label.npy").stat().st_mtime_ns == stamp


def test_cache_matches_the_engine_preprocessing(tmp_path):
    from LiverTumorSegLib.io import read_volume
    from LiverTumorSegLib.preprocess import to_model_grid
    from livertumorseg_training.cache import _grid_card, cache_params

    root = make_dataset(tmp_path / "d", n=1)
    config = _config(spacing_mm=[3.0, 2.5, 2.0])
    entries = build_cache(training_cases(root), config, tmp_path / "cache", workers=1, progress=False)
    engine = to_model_grid(read_volume(root / "imagesTr" / "liver_0.nii.gz"), _grid_card(cache_params(config)))
    cached = np.load(tmp_path / "cache" / entries["liver_0"]["files"]["ct"])
    assert cached.shape == engine.array.shape
    assert np.abs(cached - engine.array).max() <= 0.5
    assert np.allclose(entries["liver_0"]["origin_lps"], engine.origin)


# -- TorchIO bridge -----------------------------------------------------------------------
def test_reader_and_patches_keep_the_engine_axis_order(tmp_path):
    import torch

    from livertumorseg_training.transforms import CachedArrayReader, patch_to_zyx

    zyx = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    np.save(tmp_path / "a.npy", zyx)
    reader = CachedArrayReader(np.diag([-2.0, -2.0, 2.0, 1.0]), (5, 4, 6), -1024.0, "float32")
    tensor, affine = reader(tmp_path / "a.npy")
    assert tensor.shape == (1, 5, 4, 6)  # x, y, z; z padded from 3 to 6
    assert float(tensor[0, 0, 0, 0]) == -1024.0 and float(tensor[0, 4, 3, 1]) == float(zyx[0, 3, 4])
    assert np.allclose(affine[:3, 3], [0.0, 0.0, -2.0])
    back = patch_to_zyx(tensor)[0, 1:4].numpy()
    assert np.array_equal(back, zyx.astype(np.float32))
    assert torch.equal(patch_to_zyx(torch.zeros(2, 1, 5, 4, 6)), torch.zeros(2, 1, 6, 4, 5))


def test_validation_counts_each_case_once_and_pads_with_air():
    """DDP's sampler repeats cases to even out the ranks; each case must count once in
    the Dice that picks checkpoints. Validation pads windows with air, as the engine."""
    from types import SimpleNamespace

    from livertumorseg_training.module import LiverSegModule

    module = LiverSegModule(load_config("smoke"))
    module._trainer = SimpleNamespace(world_size=1)
    # what two ranks gather for 3 cases: rank 0 saw cases 0 and 2, rank 1 saw 1 and 0 again
    module._case_dice = [(0.0, 0.5, 1.0), (2.0, 0.9, 0.0), (1.0, 0.7, 0.5), (0.0, 0.5, 1.0)]
    assert module._mean_case_dice().tolist() == pytest.approx([0.7, 0.5])
    module._case_dice = []
    assert module._mean_case_dice().tolist() == [0.0, 0.0]

    import torch

    class Spy(torch.nn.Module):
        def forward(self, x):
            self.lowest = float(x.min())
            return torch.zeros((x.shape[0], 3) + tuple(x.shape[2:]))

    module.network = Spy()
    small = torch.zeros((1, 8, 8, 8))  # smaller than the 32^3 patch: padded
    module._sliding_window({"image": small, "label": torch.zeros((8, 8, 8), dtype=torch.long)})
    assert module.network.lowest == -1.0  # air in the window's scaling, not 0 (+25 HU, soft tissue)


def test_evaluation_lists_every_bad_case_before_segmenting_any(tmp_path, monkeypatch):
    """A truncated image and a label with a stray value, third and first in the list:
    both named at once, and the model never runs (it used to stop at the first bad case
    after segmenting the ones before it, with no metrics written)."""
    from livertumorseg_training import evaluation

    root = make_dataset(tmp_path / "d", n=4)
    image = root / "imagesTr" / "liver_2.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    label = np.zeros((12, 16, 20), dtype=np.uint8)
    label[5, 5, 5] = 7
    _write(root / "labelsTr" / "liver_0.nii.gz", label)

    class NeverRuns:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a case was segmented before the set was checked")

    monkeypatch.setattr("LiverTumorSegLib.pipeline.Segmenter", NeverRuns)
    with pytest.raises(DatasetError, match=r"2 of 4 case\(s\) cannot be evaluated") as info:
        evaluation.evaluate_cases("unused", training_cases(root), tmp_path / "out", progress=False)
    assert "liver_0" in str(info.value) and "liver_2" in str(info.value)
    assert str(image) in str(info.value)  # the file itself, not just liver_2.nii.gz (image and label share names)
    assert not (tmp_path / "out").exists()


def test_two_builders_saving_one_case_at_once_both_publish_a_whole_file(tmp_path, monkeypatch):
    """Two runs started together build the same case: one saves while the other is half
    way through its own save. Each must publish a whole array and neither may fail."""
    import threading

    import livertumorseg_training.cache as cache

    real_save, halfway, go_on = np.save, threading.Event(), threading.Event()

    def slow_save(file, array):
        if threading.current_thread().name == "first":
            with open(file, "wb") as handle:  # half the file, then wait for the other builder
                real_save(handle, array)
                handle.truncate(64)
                halfway.set()
                go_on.wait(10)
                handle.seek(0)
                real_save(handle, array)
        else:
            real_save(file, array)

    monkeypatch.setattr(cache.np, "save", slow_save)
    array = np.arange(4096, dtype=np.int16).reshape(16, 16, 16)
    target = tmp_path / "liver_0_ct.npy"
    failures = []

    def build():
        try:
            cache._save_npy(target, array)
        except Exception as exc:  # noqa: BLE001 - the failure is what the test reports
            failures.append(exc)

    first = threading.Thread(target=build, name="first")
    first.start()
    assert halfway.wait(10)
    build()  # the second builder, all at once
    np.testing.assert_array_equal(np.load(target), array)
    go_on.set()
    first.join(10)
    assert failures == []
    np.testing.assert_array_equal(np.load(target), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liver_0_ct.npy"]


def test_case_fingerprints_survive_a_copy_and_tell_another_data_set_of_the_same_names(tmp_path):
    import shutil

    from livertumorseg_training.data import case_fingerprints
    from LiverTumorSegLib.phantom import write_dataset

    first = write_dataset(tmp_path / "a", 2, seed=3, preset="coarse")
    shutil.copytree(first, tmp_path / "copy")  # another folder or disk: the same cases
    other = write_dataset(tmp_path / "b", 2, seed=4, preset="coarse")
    prints = case_fingerprints(training_cases(first))
    assert sorted(prints) == ["liver_0", "liver_1"]
    assert case_fingerprints(training_cases(tmp_path / "copy")) == prints
    assert all(a != b for a, b in zip(prints.values(), case_fingerprints(training_cases(other)).values()))


def test_a_stopped_cache_build_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    """Ctrl-C during caching: the cases cached so far are in the manifest, so the next
    run caches only the rest."""
    import livertumorseg_training.cache as cache

    root = make_dataset(tmp_path / "d", n=4)
    config = load_config("smoke")
    real, done = cache._run_case, []

    def stopped_at_the_third(job):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(job[0].case_id)
        return real(job)

    monkeypatch.setattr(cache, "_run_case", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        build_cache(training_cases(root), config, tmp_path / "cache", workers=1, progress=False)
    assert sorted(read_manifest(tmp_path / "cache")["cases"]) == ["liver_0", "liver_1"]
    done.clear()
    monkeypatch.setattr(cache, "_run_case", lambda job: (done.append(job[0].case_id), real(job))[1])
    build_cache(training_cases(root), config, tmp_path / "cache", workers=1, progress=False)
    assert done == ["liver_2", "liver_3"]


def test_a_caching_worker_leaves_ctrl_c_to_the_main_process():
    """The terminal sends Ctrl-C to every process: a worker that died of it printed a
    traceback each and cut its case off; the main process stops the pool instead."""
    import subprocess

    code = ("import os, signal, time\n"
            "from livertumorseg_training.cache import _worker_setup\n"
            "_worker_setup(1)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(0.2)\n"
            "print('still working')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "Training")])))
    assert result.returncode == 0 and result.stdout.strip() == "still working", result.stderr


def test_caching_workers_start_deaf_to_ctrl_c():
    """Ctrl-C while the pool's workers were still starting printed a traceback per worker:
    they must start with SIGINT ignored, not only once their initializer has run."""
    import signal
    import subprocess

    from livertumorseg_training.cache import _sigint_ignored

    before = signal.getsignal(signal.SIGINT)
    with _sigint_ignored():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        child = subprocess.run([sys.executable, "-c", "import signal; "
                                "print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"],
                               capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == "True", child.stderr
    assert signal.getsignal(signal.SIGINT) == before


# -- recipe types (mutation review) -----------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("trainer.max_epochs=true", "trainer.max_epochs must be a whole number, not True"),  # a bool is not a count
    ("optimizer.lr=true", "optimizer.lr must be a number, not True"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs must be a whole number, not 2.5"),  # else Lightning fails late
])
def test_booleans_and_fractions_are_not_counts(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_text_numbers_become_the_kind_their_key_takes():
    """A count given as text becomes an int; numbers PyYAML reads as text (2.5e2, no signed
    exponent) become floats; a number where the card wants text (a version) becomes text."""
    config = load_config("smoke", ['trainer.max_epochs="5"', "intensity.window_hu=[-2e2, 2.5e2]",
                                   "export.version=1.0"])
    assert config["trainer"]["max_epochs"] == 5 and isinstance(config["trainer"]["max_epochs"], int)
    assert config["intensity"]["window_hu"] == [-200.0, 250.0]
    assert config["export"]["version"] == "1.0"


def test_lenient_check_reaches_nested_sections_of_an_older_recipe():
    """--resume reads a checkpoint's recipe leniently: one saved before a key existed
    (data.cache_workers), with its lr as the text '3e-4', is converted, not refused."""
    import copy

    from livertumorseg_training.config import DEFAULTS, check_types

    recipe = copy.deepcopy(DEFAULTS)
    del recipe["data"]["cache_workers"]
    recipe["optimizer"]["lr"] = "3e-4"
    check_types(recipe, lenient=True)
    assert recipe["optimizer"]["lr"] == 0.0003


# -- cache rebuilds and failures (mutation review) --------------------------------------
def test_a_failed_save_leaves_the_earlier_array_whole_and_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while a case is rebuilt: another run may be memory-mapping the array,
    so it must stay whole under its name, and no half-written temporary is left."""
    import livertumorseg_training.cache as cache

    target = tmp_path / "liver_0_ct.npy"
    old = np.arange(4096, dtype=np.int16).reshape(16, 16, 16)
    np.save(target, old)
    real_save = np.save

    def disk_full(file, array):
        with open(file, "wb") as handle:
            real_save(handle, array)
            handle.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "save", disk_full)
    with pytest.raises(OSError):
        cache._save_npy(target, old + 1)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(target), old)
    assert os.listdir(tmp_path) == ["liver_0_ct.npy"]


def test_a_deleted_array_is_cached_again(tmp_path):
    root = make_dataset(tmp_path / "d", n=2)
    build_cache(training_cases(root), _config(), tmp_path / "cache", workers=1, progress=False)
    (tmp_path / "cache" / "liver_1_ct.npy").unlink()  # a clean-up, a disk quota
    build_cache(training_cases(root), _config(), tmp_path / "cache", workers=1, progress=False)
    assert (tmp_path / "cache" / "liver_1_ct.npy").is_file()


def test_a_label_edited_in_place_at_the_same_size_is_cached_again(tmp_path):
    """Uncompressed NIfTI: an edited label keeps its byte size; its modification time
    must still rebuild the case, or training reads the old labels."""
    root = make_dataset(tmp_path / "d", n=1, suffix=".nii")
    label = root / "labelsTr" / "liver_0.nii"
    first = build_cache(training_cases(root), _config(), tmp_path / "cache", workers=1, progress=False)
    size, mtime = label.stat().st_size, label.stat().st_mtime_ns
    _write(label, np.zeros((12, 16, 20), dtype=np.uint8))
    os.utime(label, ns=(mtime + 10**9, mtime + 10**9))
    assert label.stat().st_size == size
    second = build_cache(training_cases(root), _config(), tmp_path / "cache", workers=1, progress=False)
    assert first["liver_0"]["label_voxels"][1] > 0 and second["liver_0"]["label_voxels"][1] == 0


def test_a_stopped_parallel_cache_build_keeps_the_cases_its_workers_finished(tmp_path, monkeypatch):
    """Ctrl-C while the main process waits on the pool: the cases the workers finish
    (shutdown waits for them) go into the manifest, not only those collected before."""
    import livertumorseg_training.cache as cache

    root = make_dataset(tmp_path / "d", n=3)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(training_cases(root), _config(), tmp_path / "cache", workers=2, progress=False)
    manifest = read_manifest(tmp_path / "cache")
    assert manifest is not None and {"liver_0", "liver_1"} <= set(manifest["cases"])


def test_case_fingerprints_tell_another_grid_and_other_labels(tmp_path):
    """--resume's data check: uncompressed images of one size on another grid (only the
    header tells them apart), and the same images with other labels."""
    import shutil

    from livertumorseg_training.data import case_fingerprints

    a = make_dataset(tmp_path / "a", n=1, suffix=".nii", spacing=(2.0, 2.0, 3.0))
    b = make_dataset(tmp_path / "b", n=1, suffix=".nii", spacing=(1.0, 1.0, 1.0))
    assert case_fingerprints(training_cases(a)) != case_fingerprints(training_cases(b))
    c = make_dataset(tmp_path / "c", n=1)
    shutil.copytree(c, tmp_path / "e")
    relabelled = np.zeros((12, 16, 20), dtype=np.uint8)
    relabelled[1:-1, 2:-2, 2:-2] = np.random.default_rng(0).integers(0, 3, (10, 12, 16))
    _write(tmp_path / "e" / "labelsTr" / "liver_0.nii.gz", relabelled)
    assert case_fingerprints(training_cases(c)) != case_fingerprints(training_cases(tmp_path / "e"))
