"""Item 4: training patches per second, our cached loader against the seed's queue.

Both pipelines sample the same phantom cases (an MSD Task03-layout folder written by
:func:`LiverTumorSegLib.phantom.write_dataset`) with the same recipe (``seed.yaml``:
``tio.Queue``, LabelSampler 0.2/0.3/0.5, RandomAffine, CropOrPad 256 x 256 x 200,
batch 2) and the same number of queue workers:

* ``seed``: TorchIO reads the ``.nii.gz`` files and reorients (``ToCanonical``),
  resamples (``Resample(1.5)``), crops or pads, rescales intensities (per-volume min-max
  to [-1, 1]) and augments on every visit of a subject, as the seed script did;
* ``cached``: ``livertumorseg_training.data.LiverDataModule`` (the training package's
  loader): the cases are resampled once into memory-mappable ``.npy`` files (the cache
  build is timed and reported separately), then the queue reads those, sampling each
  patch with a margin; the random affine acts on the patches
  (``livertumorseg_training.augment.PatchAugmenter``, applied on the CPU inside the timed
  loop, where training would apply it on its own device), not on whole volumes.

One measurement is one epoch: a fresh loader iterator drawing every patch of every
training subject (cases x samples per volume), including the first queue fill.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .measure import interleaved, summary

TRAINING_DIR = Path(__file__).resolve().parent.parent / "Training"


def _training_package():
    if str(TRAINING_DIR) not in sys.path:
        sys.path.insert(0, str(TRAINING_DIR))
    import livertumorseg_training  # noqa: F401  (raises ImportError when absent)

    return livertumorseg_training


def dataset_folder(cases: int, preset: str, seed: int = 5, log=print) -> Path:
    """The phantom data set (made on first use, in the bench-inputs folder)."""
    from LiverTumorSegLib.phantom import write_dataset

    from .inputs import inputs_dir

    folder = inputs_dir() / f"loader-{preset}-{cases}cases-seed{seed}"
    if not (folder / "dataset.json").is_file():
        log(f"writing {cases} {preset} phantom cases to {folder}")
        write_dataset(folder, cases, seed, test_cases=0, preset=preset)
    return folder


def seed_loader(cases, config: dict):
    """The seed's pipeline: a TorchIO queue over the ``.nii.gz`` files."""
    import torchio as tio
    from torch.utils.data import DataLoader

    s, d, a = config["sampling"], config["data"], config["augmentation"]
    subjects = [tio.Subject(ct=tio.ScalarImage(c.image), label=tio.LabelMap(c.label), case_id=c.case_id)
                for c in cases]
    steps = [tio.ToCanonical(), tio.Resample(tuple(float(v) for v in d["spacing_mm"]))]
    if d["crop_or_pad"]:
        steps.append(tio.CropOrPad(tuple(int(v) for v in d["crop_or_pad"]), padding_mode="minimum"))
    steps.append(tio.RescaleIntensity(out_min_max=tuple(config["intensity"]["output_range"])))
    if a["affine_scales"] or a["affine_degrees"]:
        steps.append(tio.RandomAffine(scales=tuple(a["affine_scales"]) if a["affine_scales"] else 0,
                                      degrees=float(a["affine_degrees"])))
    patch_xyz = tuple(reversed([int(p) for p in s["patch_size"]]))
    queue = tio.Queue(
        tio.SubjectsDataset(subjects, transform=tio.Compose(steps)), max_length=int(s["queue_length"]),
        samples_per_volume=int(s["samples_per_volume"]), num_workers=int(s["num_workers"]),
        sampler=tio.LabelSampler(patch_xyz, label_name="label",
                                 label_probabilities={int(k): float(v) for k, v in s["label_probabilities"].items()}),
        shuffle_subjects=True, shuffle_patches=True,
    )
    return DataLoader(queue, batch_size=int(config["trainer"]["batch_size"]), num_workers=0)


def _epoch(make_loader, augment=None) -> int:
    """Draw one epoch from a fresh loader; returns the number of patches. ``augment``
    (batch -> batch) is the per-patch augmentation training applies on its device; here
    it runs on the CPU inside the timed loop."""
    n = 0
    for batch in make_loader():
        if augment is not None:
            batch["image"], batch["label"] = augment(batch["image"], batch["label"])
        n += len(batch["case_id"]) if isinstance(batch, dict) and "case_id" in batch else int(
            batch["ct"]["data"].shape[0])
    return n


NO_SPATIAL_AUGMENTATION = ("augmentation.affine_scales=null", "augmentation.affine_degrees=0")


def run_variants(cases: int, preset: str, reps: int, workers: int, overrides: Sequence[str] = (),
                 log=print) -> dict:
    """The seed recipe as it is, and without its whole-volume RandomAffine (to show where
    the time goes); the headline ``speedup`` is the recipe's own."""
    main = run(cases, preset, reps, workers, overrides, log)
    if "rows" in main:
        log("loader: the same without spatial augmentation")
        main["without_spatial_augmentation"] = run(cases, preset, reps, workers,
                                                   [*overrides, *NO_SPATIAL_AUGMENTATION], log)
    return main


def run(cases: int, preset: str, reps: int, workers: int, overrides: Sequence[str] = (), log=print) -> dict:
    """Both loaders, interleaved; returns the JSON section ``loader``."""
    try:
        _training_package()
        from livertumorseg_training.config import load_config
        from livertumorseg_training.data import LiverDataModule
        from livertumorseg_training.augment import PatchAugmenter
        from livertumorseg_training.dataset import training_cases
    except ImportError as exc:
        return {"status": f"not measured: the training package's cached loader is not importable ({exc})"}
    data_dir = dataset_folder(cases, preset, log=log)
    config = load_config("seed", [f"sampling.num_workers={workers}", "data.validation_fraction=0.001",
                                  "data.cache_workers=1", *overrides])
    subjects = training_cases(data_dir)
    cache_dir = Path(tempfile.mkdtemp(prefix="ltsbench-cache-"))
    try:
        module = LiverDataModule(data_dir, config, cache_dir=cache_dir)
        augmenter = PatchAugmenter.from_config(config)
        t = time.perf_counter()
        module.setup("fit")
        cache_build_s = time.perf_counter() - t
        train = module.train_cases
        n_expected = len(train) * int(config["sampling"]["samples_per_volume"])
        seed_cases = [c for c in subjects if c.case_id in {x.case_id for x in train}]
        counts = {}

        def keep(name, rep, n):
            counts[name] = n

        runs = interleaved({"seed_nii_queue": lambda: _epoch(lambda: seed_loader(seed_cases, config)),
                            "cached_queue": lambda: _epoch(module.train_dataloader, augmenter)}, reps, keep, log)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    rows = {name: summary(samples) for name, samples in runs.items()}
    for name, row in rows.items():
        row["patches_per_epoch"] = counts[name]
        row["patches_per_s"] = counts[name] / row["seconds_median"]
    return {
        "cases": len(train), "preset": preset, "patch_size": config["sampling"]["patch_size"],
        "queue_workers": workers, "samples_per_volume": config["sampling"]["samples_per_volume"],
        "expected_patches_per_epoch": n_expected, "cache_build_s": cache_build_s, "rows": rows,
        "speedup": rows["cached_queue"]["patches_per_s"] / rows["seed_nii_queue"]["patches_per_s"],
        "recipe": "Training/configs/seed.yaml with " + ", ".join(
            [f"sampling.num_workers={workers}", "data.validation_fraction=0.001", *overrides]),
    }
