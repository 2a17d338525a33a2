"""The Lightning DataModule: cache once, then TorchIO patch queues read the cache.

Training: a ``tio.Queue`` (``max_length`` 40, 5 samples per volume in the seed) fed by
a ``LabelSampler`` (background 0.2, liver 0.3, tumor 0.5) over subjects read from the
memory-mapped cache. Training patches are sampled with a margin and augmented one by one
on the training device (:mod:`.augment`), not as whole volumes. Validation either samples
patches the same way without augmentation (the seed) or yields whole cached volumes
for the engine's sliding window (``validation.mode: sliding_window``).

Under DDP each process gets its own share of the subjects (a ``DistributedSampler``
drives the queue), so ranks never train on the same patches.

Randomness: the training queue is made anew every epoch (``reload_dataloaders_every_n_epochs``)
and reseeds torch, numpy, random and its workers from (recipe seed, epoch, rank) when
the epoch's first patch is asked for. An epoch's patches and augmentation are thus the
same whether the run went straight through or was resumed from the previous epoch's
``last.ckpt`` (resuming used to replay the first epoch's stream). A run resumed
mid-epoch (a SLURM requeue) starts that epoch's stream again.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import lightning as L
import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .augment import sampled_patch_size
from .cache import build_cache, default_cache_dir, entry_volume, load_arrays, other_caches
from .dataset import Case, split_cases, training_cases
from .sampling import FastLabelSampler
from .transforms import (AIR_HU, CachedArrayReader, CachedLabelMap, CachedScalarImage, EngineIntensity,
                         build_transforms, intensity_per_patch, patch_to_zyx, reader_padding)


def collate_patches(batch: List[tio.Subject]) -> dict:
    """Stack TorchIO patches into engine-ordered tensors: image (N, 1, Z, Y, X) (float32,
    or int16 HU when the training device scales it), label (N, Z, Y, X) int64."""
    image = torch.stack([patch_to_zyx(s["ct"].data) for s in batch])
    label = torch.stack([patch_to_zyx(s["label"].data[0].long()) for s in batch])
    return {"image": image, "label": label, "case_id": [s["case_id"] for s in batch]}


def reseed(*position: int) -> None:
    """Seed torch, numpy, random and the data workers from a position in the run (recipe
    seed, epoch, rank), so the stream depends on where it is, not on how it got there."""
    digest = hashlib.sha256(":".join(str(v) for v in position).encode()).digest()
    L.seed_everything(int.from_bytes(digest[:4], "little"), workers=True, verbose=False)


class EpochQueue(tio.Queue):
    """A ``tio.Queue`` for one epoch that calls ``on_epoch_start`` (the reseeding) when
    its first patch is asked for, after the loaders around it have drawn their seeds."""

    def __init__(self, *args, on_epoch_start: Callable[[], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_epoch_start = on_epoch_start

    def __getitem__(self, index):
        if index == 0:
            self.on_epoch_start()
        return super().__getitem__(index)


class WholeVolumes(Dataset):
    """Cached cases as whole, intensity-scaled volumes cropped to the body (like the engine)."""

    def __init__(self, entries: List[dict], cache_dir: Path, config: dict) -> None:
        self.entries = entries
        self.cache_dir = Path(cache_dir)
        it = config["intensity"]
        self.scale = EngineIntensity(it["mode"], it["window_hu"], it["output_range"])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        from LiverTumorSegLib.preprocess import body_bounding_box

        entry = self.entries[index]
        ct, label = load_arrays(entry, self.cache_dir)
        hu = np.asarray(ct, dtype=np.float32)
        box = body_bounding_box(hu) or tuple(slice(0, n) for n in hu.shape)
        image = self.scale(torch.from_numpy(np.ascontiguousarray(hu[box])))
        return {"image": image[None], "label": torch.from_numpy(np.asarray(label[box], dtype=np.int64)),
                "case_id": entry["case_id"], "index": index, "spacing_mm": list(entry["spacing_mm"])}


def _first(batch: list) -> dict:
    return batch[0]


def case_fingerprints(cases: List[Case]) -> Dict[str, str]:
    """Per case, 12 hex digits of a SHA-256 of what tells one data set's case from
    another's of the same name without reading its voxels: the image's grid size and
    spacing (from its header) and the byte sizes of its image and label files. A copy of
    the data set (another folder, disk or download) gives the same; another data set
    whose cases are named alike (phantoms of another seed) does not. ``--resume``
    compares them."""
    from LiverTumorSegLib.io import read_header

    def size(path: Path):
        try:
            return Path(path).stat().st_size
        except OSError:
            return None

    out = {}
    for case in cases:
        parts = (read_header(case.image), size(case.image), size(case.label))
        out[case.case_id] = hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
    return out


class LiverDataModule(L.LightningDataModule):
    """Data set, split, cache and loaders for one recipe.

    Args:
        data_dir: the MSD Task03-layout folder holding ``dataset.json``.
        config: the resolved recipe.
        cache_dir: cache folder; default :func:`~.cache.default_cache_dir`, named by its
            preprocessing, so other settings or code give another folder (a given folder
            whose manifest differs is refused: see :func:`~.cache.build_cache`).
    """

    def __init__(self, data_dir: Path, config: dict, cache_dir: Optional[Path] = None) -> None:
        super().__init__()
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.config = config
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.data_dir, config)
        self.rebuild_stale_cache = not cache_dir
        self.train_cases: List[Case] = []
        self.val_cases: List[Case] = []
        self.entries: dict = {}
        self._train_sampler = None
        self._val_sampler = None

    # -- preparation ---------------------------------------------------------------
    def split(self) -> None:
        """Read ``dataset.json`` and split it (cheap; every process does it)."""
        data = self.config["data"]
        cases = training_cases(self.data_dir)
        self.train_cases, self.val_cases = split_cases(cases, float(data["validation_fraction"]),
                                                       data["folds"], int(data["fold"]))

    def prepare_data(self) -> None:
        """Build the cache (one process per node under DDP)."""
        self.split()
        build_cache(self.train_cases + self.val_cases, self.config, self.cache_dir,
                    workers=self.config["data"]["cache_workers"], rebuild_stale=self.rebuild_stale_cache)
        others = other_caches(self.cache_dir) if self.rebuild_stale_cache else []
        if others:
            print(f"note: {len(others)} cache(s) of other preprocessing (other settings or code) lie beside "
                  f"{self.cache_dir.name} in {self.cache_dir.parent}: {', '.join(p.name for p in others)}; "
                  "delete them once no run reads them", file=sys.stderr)

    def setup(self, stage: Optional[str] = None) -> None:
        self.split()
        self.entries = build_cache(self.train_cases + self.val_cases, self.config, self.cache_dir,
                                   workers=self.config["data"]["cache_workers"], progress=False,
                                   rebuild_stale=self.rebuild_stale_cache)

    def data_summary(self) -> dict:
        """What the model saw: the data set, the split and the cache parameters."""
        from .dataset import read_dataset_json

        info = read_dataset_json(self.data_dir)
        return {
            "data_dir": str(self.data_dir),
            "dataset_name": str(info.get("name", "")),
            "dataset_description": str(info.get("description", "")),
            "dataset_reference": str(info.get("reference", "")),
            "dataset_licence": str(info.get("licence", info.get("license", ""))),
            "split": {"validation_fraction": self.config["data"]["validation_fraction"],
                      "folds": self.config["data"]["folds"], "fold": self.config["data"]["fold"],
                      "order": "sequential, as listed in dataset.json"},
            "training_cases": [c.case_id for c in self.train_cases],
            "validation_cases": [c.case_id for c in self.val_cases],
            "case_fingerprints": case_fingerprints(self.train_cases + self.val_cases),
        }

    # -- subjects and loaders ------------------------------------------------------
    def _subject(self, case: Case, patch_zyx, train: bool = False) -> tio.Subject:
        entry = self.entries[case.case_id]
        ijk_to_ras = entry_volume(entry, np.empty((1, 1, 1))).ijk_to_ras()
        min_xyz = tuple(reversed([int(p) for p in patch_zyx]))
        pad = reader_padding(self.config, train)
        crop = self.config["data"]["crop_or_pad"]
        # HU stays int16 (half the memory traffic) when the patches are scaled on the device
        ct_dtype = "int16" if intensity_per_patch(self.config, train) else "float32"
        ct_reader = CachedArrayReader(ijk_to_ras, min_xyz, AIR_HU, ct_dtype, pad, crop)
        label_reader = CachedArrayReader(ijk_to_ras, min_xyz, 0, "uint8", pad, crop)
        return tio.Subject(
            ct=CachedScalarImage(self.cache_dir / entry["files"]["ct"], reader=ct_reader),
            label=CachedLabelMap(self.cache_dir / entry["files"]["label"], reader=label_reader),
            case_id=case.case_id,
        )

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def _distributed(self) -> bool:
        return self._trainer_attached() and self.trainer.world_size > 1

    def _sampler(self, dataset: Dataset, shuffle: bool):
        if not self._distributed():
            return None
        return DistributedSampler(dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                  shuffle=shuffle, seed=int(self.config["seed"]), drop_last=False)

    def _queue(self, cases: List[Case], train: bool) -> tuple:
        sampling = self.config["sampling"]
        patch_zyx = sampled_patch_size(self.config) if train else sampling["patch_size"]
        subjects = tio.SubjectsDataset([self._subject(c, patch_zyx, train) for c in cases],
                                       transform=build_transforms(self.config, train, geometry_in_reader=True))
        sampler = self._sampler(subjects, shuffle=train)
        patch_xyz = tuple(reversed([int(p) for p in patch_zyx]))
        probabilities = {int(k): float(v) for k, v in sampling["label_probabilities"].items()}
        kwargs = dict(max_length=int(sampling["queue_length"]), samples_per_volume=int(sampling["samples_per_volume"]),
                      sampler=FastLabelSampler(patch_xyz, label_name="label", label_probabilities=probabilities),
                      subject_sampler=sampler, num_workers=int(sampling["num_workers"]),
                      shuffle_subjects=train and sampler is None, shuffle_patches=train, start_background=False)
        if not train:
            return tio.Queue(subjects, **kwargs), sampler
        epoch = self.trainer.current_epoch if self._trainer_attached() else 0
        if sampler is not None:
            sampler.set_epoch(epoch)
        rank = self.trainer.global_rank if self._trainer_attached() else 0
        return EpochQueue(subjects, on_epoch_start=lambda: reseed(int(self.config["seed"]), epoch, rank),
                          **kwargs), sampler

    def train_dataloader(self) -> DataLoader:
        queue, self._train_sampler = self._queue(self.train_cases, train=True)
        return DataLoader(queue, batch_size=int(self.config["trainer"]["batch_size"]), num_workers=0,
                          collate_fn=collate_patches)

    def val_dataloader(self) -> DataLoader:
        validation = self.config["validation"]
        cases = self.val_cases[: validation["max_cases"]] if validation["max_cases"] else self.val_cases
        if validation["mode"] == "sliding_window":
            dataset = WholeVolumes([self.entries[c.case_id] for c in cases], self.cache_dir, self.config)
            self._val_sampler = self._sampler(dataset, shuffle=False)
            return DataLoader(dataset, batch_size=1, sampler=self._val_sampler, num_workers=0, collate_fn=_first)
        queue, self._val_sampler = self._queue(cases, train=False)
        return DataLoader(queue, batch_size=int(self.config["trainer"]["batch_size"]), num_workers=0,
                          collate_fn=collate_patches)

