"""Synthetic abdominal CT phantoms with liver and liver-tumour labels.

:func:`make_phantom` draws one case from a seed: a patient (body with fat and muscle
layers, spine, ribs, lungs, liver with texture, vessels and 0 to several tumours,
spleen, kidneys, stomach with gas, gallbladder, heart, aorta, IVC) described in
physical millimetres, rendered on a voxel grid of random spacing, size and orientation
(LPS, RAS-like flips, permuted axes or oblique). The CT image is int16 Hounsfield units
(air -1000); labels are uint8: 0 background, 1 liver parenchyma, 2 tumour (tumour is inside the liver).

:func:`make_geometry_variants` renders one patient on several grids (for geometry
round-trip tests) and :func:`write_dataset` writes a data set in the layout of the
Medical Segmentation Decathlon Task03_Liver.

The same seed always gives bit-identical arrays. Anatomy, tumours, grid and noise come
from separate random streams, so overriding the grid keeps the same patient.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .atomic import StagedOutput, atomic_write_text, check_writable_dir
from .errors import OutputError
from .phantom_anatomy import Anatomy, PhantomError, draw_anatomy, finish_anatomy
from .phantom_render import Grid, Textures, make_textures, render
from .phantom_shapes import rotation_matrix
from .volume import Volume

ORIENTATIONS = ("lps", "ras", "permuted", "oblique")
PRESETS = ("full", "coarse")
_FULL_MATRIX = 512
_MAX_SLICES = 300
_VARIANT_VOXELS = 1_900_000


@dataclass
class PhantomCase:
    """One synthetic case: CT ``image`` (int16 HU), ``labels`` (uint8, same grid) and ``info``.

    ``info`` holds: seed, preset, orientation, spacing (x, y, z mm), shape (x, y, z voxels),
    origin (LPS mm), direction (3x3, columns = i, j, k axes in LPS), noise_hu, phase
    ("plain" or "contrast"), liver_hu, and tumors: a list of dicts with centre_lps_mm
    (x, y, z), diameter_mm, kind ("hypo" or "hyper") and hu. On a coarse grid a tumour of
    a few mm may cover no voxel centre, so it can be listed without label-2 voxels.
    """

    image: Volume
    labels: Volume
    info: dict


def _streams(seed: int) -> tuple:
    """Independent generators for anatomy, tumours, textures, grid and noise."""
    children = np.random.SeedSequence(int(seed)).spawn(5)
    return tuple(np.random.default_rng(c) for c in children)


def _anatomy(seed: int, n_tumors: int | None, tumor_diameters_mm: tuple | None) -> tuple:
    r_anat, r_tum, r_tex, r_grid, r_noise = _streams(seed)
    an = draw_anatomy(r_anat)
    finish_anatomy(an, r_anat, r_tum, n_tumors, tumor_diameters_mm)
    textures = make_textures(an, int(r_tex.integers(2**31)))
    return an, textures, r_grid, r_noise


def _direction(kind: str, rng: np.random.Generator) -> tuple:
    """(3x3 LPS direction, permutation array axis -> physical axis) for an orientation kind."""
    if kind == "lps":
        return np.eye(3), (0, 1, 2)
    if kind == "ras":
        return np.diag([-1.0, -1.0, 1.0]), (0, 1, 2)
    if kind == "permuted":
        perms = [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
        perm = perms[int(rng.integers(len(perms)))]
        d = np.zeros((3, 3))
        for a, p in enumerate(perm):
            d[p, a] = 1.0 if rng.random() < 0.5 else -1.0
        return d, perm
    if kind == "oblique":
        angle = np.radians(rng.uniform(5.0, 20.0)) * (1.0 if rng.random() < 0.5 else -1.0)
        base = np.eye(3) if rng.random() < 0.5 else np.diag([-1.0, -1.0, 1.0])
        return rotation_matrix(rng.normal(size=3), angle) @ base, (0, 1, 2)
    raise PhantomError(f"orientation must be one of {ORIENTATIONS} or None, not {kind!r}")


def _fit_shape(direction: np.ndarray, spacing: np.ndarray, centre: np.ndarray, lo: np.ndarray,
               hi: np.ndarray) -> np.ndarray:
    """Voxels per array axis so that a grid centred at ``centre`` covers the box [lo, hi] (mm)."""
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    proj = np.abs((corners - centre) @ direction).max(axis=0)
    return 2 * np.ceil(proj / spacing - 1e-6).astype(np.int64) + 1


def _draw_grid(an: Anatomy, rng: np.random.Generator, preset: str, spacing, shape, orientation) -> tuple:
    """(Grid, orientation kind) for a case; box extents in patient-frame mm."""
    if preset not in PRESETS:
        raise PhantomError(f"preset must be one of {PRESETS}, not {preset!r}")
    kind = orientation if orientation is not None else str(
        rng.choice(ORIENTATIONS, p=[0.35, 0.25, 0.15, 0.25]))
    direction, perm = _direction(kind, rng)
    b = an.body
    lo_l, hi_l = an.liver_lo, an.liver_hi
    centre = np.array([rng.uniform(-15, 15), (b.b_post - b.b_ant) / 2.0 + rng.uniform(-15, 15), 0.0])
    if preset == "full":
        s_in = round(float(rng.uniform(0.6, 1.0)), 3)
        thick = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]))
        top = hi_l[2] + rng.uniform(15.0, 60.0)
        need = top - lo_l[2] + 10.0
        n_z = int(min(max(np.ceil(need / thick), rng.uniform(200.0, 450.0) / thick), _MAX_SLICES))
        centre[2] = top - n_z * thick / 2.0
        s_phys = np.array([s_in, s_in, thick])
        n_phys = np.array([_FULL_MATRIX, _FULL_MATRIX, n_z])
        must_lo, must_hi = lo_l - 10.0, hi_l + 10.0
    else:
        s_in = round(float(rng.uniform(2.7, 3.3)), 3)
        s_phys = np.array([s_in, s_in, round(float(rng.uniform(2.5, 4.0)), 3)])
        centre[2] = (lo_l[2] + hi_l[2]) / 2.0
        half = np.array([b.a * 1.08 + 5.0, (b.b_ant + b.b_post) / 2.0 + 5.0, (hi_l[2] - lo_l[2]) / 2.0 + 12.0])
        must_lo, must_hi = centre - half, centre + half
        n_phys = np.zeros(3, dtype=np.int64)
    s_arr = np.asarray(spacing, dtype=np.float64) if spacing is not None else s_phys[list(perm)]
    if shape is not None:
        n_arr = np.asarray(shape, dtype=np.int64)
    else:
        if spacing is None:
            n_arr = n_phys[list(perm)]
        else:
            extent = np.abs(direction).T @ (n_phys * s_phys)
            n_arr = np.ceil(extent / s_arr - 1e-6).astype(np.int64)
        n_arr = np.maximum(n_arr, _fit_shape(direction, s_arr, centre, must_lo, must_hi))
    return _grid(an, direction, s_arr, n_arr, centre), kind


def _grid(an: Anatomy, direction: np.ndarray, spacing: np.ndarray, shape: np.ndarray, centre: np.ndarray) -> Grid:
    """Grid whose centre voxel lies at patient-frame ``centre`` (mm)."""
    half = direction @ (spacing * (shape - 1) / 2.0)
    origin = np.asarray(an.centre_lps) + centre - half
    return Grid(tuple(int(v) for v in shape), tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
                direction)


def _case(seed: int, an: Anatomy, textures: Textures, grid: Grid, kind: str, noise_hu: float,
          rng_noise: np.random.Generator, preset: str) -> PhantomCase:
    image, labels = render(an, grid, textures, noise_hu, rng_noise)
    vol = Volume(array=image, spacing=grid.spacing, origin=grid.origin, direction=grid.direction)
    tumours = [{
        "centre_lps_mm": [float(v) for v in np.asarray(t.organ.shape.centre) + np.asarray(an.centre_lps)],
        "diameter_mm": round(t.diameter_mm, 2), "kind": t.kind, "hu": round(t.hu, 1),
    } for t in an.tumours]
    info = {
        "seed": int(seed), "preset": preset, "orientation": kind, "spacing": grid.spacing, "shape": grid.shape,
        "origin": grid.origin, "direction": np.asarray(grid.direction).tolist(), "noise_hu": float(noise_hu),
        "phase": an.phase, "liver_hu": round(an.hu["liver"], 1), "tumors": tumours,
    }
    return PhantomCase(image=vol, labels=vol.with_array(labels), info=info)


def make_phantom(seed: int, *, spacing: tuple | None = None, shape: tuple | None = None,
                 orientation: str | None = None, n_tumors: int | None = None,
                 tumor_diameters_mm: tuple | None = None, noise_hu: float | None = None,
                 preset: str = "full") -> PhantomCase:
    """Make one synthetic abdominal CT case.

    Args:
        seed: random seed; the same arguments always give bit-identical volumes.
        spacing: voxel size in mm per array axis (x, y, z) = (i, j, k); None draws it from
            ``preset`` ("full": 0.6-1.0 mm in-plane, 1-5 mm slices; "coarse": about 3 mm).
        shape: voxels per array axis (x, y, z); None fits the preset's field of view
            (512 x 512 in-plane for "full", the body and the liver's height for "coarse").
        orientation: "lps", "ras" (x and y flipped), "permuted" (axes swapped),
            "oblique" (rotated 5-20 degrees) or None to draw it from the seed.
        n_tumors: number of tumours (None: drawn, 0 in about a quarter of the cases).
        tumor_diameters_mm: one diameter in mm per tumour, or a (min, max) range in mm
            when ``n_tumors`` is given and differs from its length; diameters are >= 3 mm.
        noise_hu: standard deviation of the Gaussian noise in HU (None: drawn in 10-25).
        preset: "full" or "coarse".

    Returns:
        A :class:`PhantomCase`; anatomy sizes are physical, whatever the grid.
    """
    if n_tumors is not None and n_tumors < 0:
        raise PhantomError("n_tumors must be >= 0")
    if preset not in PRESETS or (orientation is not None and orientation not in ORIENTATIONS):
        raise PhantomError(f"preset must be one of {PRESETS} and orientation one of {ORIENTATIONS} or None")
    for name, value in (("spacing", spacing), ("shape", shape)):
        if value is not None and (np.shape(value) != (3,) or not np.all(np.asarray(value, dtype=float) > 0)):
            raise PhantomError(f"{name} must be 3 positive numbers in (x, y, z) order, not {value!r}")
    an, textures, r_grid, r_noise = _anatomy(seed, n_tumors, tumor_diameters_mm)
    grid, kind = _draw_grid(an, r_grid, preset, spacing, shape, orientation)
    noise = float(r_noise.uniform(10.0, 25.0)) if noise_hu is None else float(noise_hu)
    return _case(seed, an, textures, grid, kind, noise, r_noise, preset)


def make_geometry_variants(seed: int) -> dict[str, PhantomCase]:
    """The same patient (same seed, same tumours) on four grids around the liver.

    Returns a dict of :class:`PhantomCase`: "lps" (identity direction, 2 x 2 x 2.5 mm),
    "ras" (x and y flipped, 1.8 x 1.8 x 3 mm), "oblique" (rotated 15 degrees, 2.2 mm) and
    "anisotropic" (0.9 x 0.9 x 5 mm); each covers the liver with a 10 mm margin. A grid
    that would exceed 1.9 million voxels gets a larger spacing (in-plane only for
    "anisotropic"), so every variant stays small.
    """
    an, textures, r_grid, r_noise = _anatomy(seed, None, None)
    noise = float(r_noise.uniform(10.0, 25.0))
    lo, hi = an.liver_lo - 10.0, an.liver_hi + 10.0
    centre = (lo + hi) / 2.0
    rot = rotation_matrix((1.0, -0.5, 0.3), np.radians(15.0))
    layouts = {
        "lps": (np.eye(3), (2.0, 2.0, 2.5)),
        "ras": (np.diag([-1.0, -1.0, 1.0]), (1.8, 1.8, 3.0)),
        "oblique": (rot, (2.2, 2.2, 2.2)),
        "anisotropic": (np.eye(3), (0.9, 0.9, 5.0)),
    }
    cases = {}
    for name, (direction, spacing) in layouts.items():
        s = np.asarray(spacing)
        shape = _fit_shape(direction, s, centre, lo, hi)
        while np.prod(shape) > _VARIANT_VOXELS:
            s = np.round(s * (1.05, 1.05, 1.0 if name == "anisotropic" else 1.05), 3)
            shape = _fit_shape(direction, s, centre, lo, hi)
        grid = _grid(an, direction, s, shape, centre)
        rng = np.random.default_rng([int(seed), len(cases)])
        cases[name] = _case(seed, an, textures, grid, name, noise, rng, "variants")
    return cases


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a data set made with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _write_image(img: sitk.Image, path: Path) -> None:
    """Write a NIfTI file (into the staging folder)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path), True, 1)
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"cannot write {path}: {exc}; choose a writable output folder") from None


DATASET_REFERENCE = "LiverTumorSegLib.phantom"  # dataset.json's "reference": a data set of this command
_LISTED = re.compile(r"^\./(imagesTr|labelsTr|imagesTs)/liver_[0-9]+\.nii\.gz$")
_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs")


def earlier_dataset_files(root: Path) -> list[str] | None:
    """The case files (``imagesTr/liver_0.nii.gz``, ...) that an earlier :func:`write_dataset`
    listed in ``root/dataset.json``; None when there is no such record (no file, a link,
    not JSON, or another program's ``dataset.json``). Only names this command writes count."""
    path = Path(root) / "dataset.json"
    if path.is_symlink():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("reference") != DATASET_REFERENCE:
            return None
        listed = [p for entry in meta.get("training", []) for p in (entry["image"], entry["label"])]
        listed += list(meta.get("test", []))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return sorted({p[2:] for p in listed if isinstance(p, str) and _LISTED.match(p)})


#: Files a file manager puts into any folder it shows (macOS Finder, Windows Explorer):
#: they do not make a folder someone else's data set.
OS_METADATA = {".DS_Store", "Thumbs.db", "desktop.ini"}


def _check_target(root: Path) -> list[str]:
    """What an earlier run of this command wrote into ``root`` (to remove what this run
    does not write again); refuses a folder with other contents, whose files could have
    the names this command writes (a real Task03 download)."""
    if not root.is_dir():
        return []
    listed = earlier_dataset_files(root)
    if listed is not None:
        return listed
    staging = (f".{root.name}.partial-", f".{root.name}.creating-")  # another run's, or a killed one's
    for entry in root.iterdir():
        if entry.name.startswith(staging) or entry.name in OS_METADATA or entry.name.startswith("._"):
            continue
        if entry.name in _SUBFOLDERS and entry.is_dir() and not entry.is_symlink() and not any(entry.iterdir()):
            continue
        raise OutputError(f"{root} is not empty and holds no data set written by the phantom command (its "
                          "dataset.json); choose a new or empty folder")
    return []


def write_dataset(out_dir, cases: int, seed: int, *, test_cases: int | None = None, preset: str = "full",
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a synthetic data set in the MSD Task03_Liver layout and return its folder.

    Training case i goes to imagesTr/liver_{i}.nii.gz and labelsTr/liver_{i}.nii.gz,
    test case j (numbered after the training cases, no label) to imagesTs/liver_{j}.nii.gz,
    and dataset.json lists them. Case i is made with seed :func:`case_seed` (seed, i).
    ``test_cases`` defaults to max(1, cases // 5). ``progress(done, total)`` is called
    after each case (it may raise :class:`~.errors.Cancelled` to stop).

    Every file is written into a hidden staging folder (inside ``out_dir`` when it exists)
    and moved in once all are complete, dataset.json last, so a stopped run changes
    nothing. ``out_dir`` must be new, empty, or hold a data set of this command: then the
    case files its dataset.json lists and this run does not write are removed (no other
    file is touched), so the folder holds exactly the new data set's cases.
    Raises :class:`PhantomError` for bad arguments and :class:`~.errors.OutputError`
    when the folder cannot be written or holds something else.
    """
    if cases < 0 or (test_cases is not None and test_cases < 0):
        raise PhantomError("the number of training and test cases must be 0 or more")
    if preset not in PRESETS:
        raise PhantomError(f"preset must be one of {PRESETS}, not {preset!r}")
    n_test = max(1, cases // 5) if test_cases is None else int(test_cases)
    root = check_writable_dir(Path(out_dir))
    _check_target(root)  # refuse another program's folder now, not after making every case
    # The earlier set's record is read again when publishing, under the folder's lock:
    # another run may have published meanwhile.
    with StagedOutput(root, replaces=lambda: _check_target(root), last="dataset.json") as staged:
        stage = staged.path
        total = cases + n_test
        training, test = [], []
        for index in range(total):
            case = make_phantom(case_seed(seed, index), preset=preset)
            name = f"liver_{index}.nii.gz"
            if index < cases:
                _write_image(case.image.to_sitk(), stage / "imagesTr" / name)
                _write_image(case.labels.to_sitk(), stage / "labelsTr" / name)
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            else:
                _write_image(case.image.to_sitk(), stage / "imagesTs" / name)
                test.append(f"./imagesTs/{name}")
            if progress is not None:
                progress(index + 1, total)
        meta = {
            "name": "LiverPhantom",
            "description": "Synthetic abdominal CT phantom (LiverTumorSeg phantom generator, seed "
                           f"{int(seed)}, preset {preset}); not patient data. Layout of MSD Task03_Liver.",
            "reference": DATASET_REFERENCE, "licence": "CC0", "release": "1.0",
            "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "numTraining": cases, "numTest": n_test, "training": training, "test": test,
        }
        atomic_write_text(stage / "dataset.json", json.dumps(meta, indent=4) + "\n")
    for sub in _SUBFOLDERS:  # the layout's folders, as before, even those without a case
        (root / sub).mkdir(exist_ok=True)
    return root
