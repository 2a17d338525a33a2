"""Tests of LiverTumorSegLib.preview: a readable RGB PNG in radiological orientation."""

from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.preview import write_preview_png
from LiverTumorSegLib.volume import Volume

from .helpers import real_data


def phantom() -> tuple:
    """Identity-direction (i -> L, j -> P, k -> S) CT at 0 HU with a liver block and a tumor.

    The liver sits on the patient's right (low i), anterior (low j) and superior (high k).
    """
    shape = (40, 50, 60)  # (z, y, x)
    ct = np.zeros(shape, dtype=np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[22:38, 5:20, 5:25] = 1
    labels[28:32, 10:14, 10:16] = 2
    geometry = dict(spacing=(0.8, 0.8, 2.0), origin=(5.0, 6.0, 7.0))
    return Volume(ct, **geometry), Volume(labels, **geometry)


def read_rgb(path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetDimension() == 2
    return sitk.GetArrayFromImage(image)


def colour_masks(rgb: np.ndarray) -> tuple:
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    reddish = (r > g + 20) & (r > b + 20)
    greenish = (g > r + 20) & (g > b + 20)
    grey = (r == g) & (g == b)
    return reddish, greenish, grey


def test_png_written_with_overlays(tmp_path):
    ct, labels = phantom()
    path = tmp_path / "preview.png"
    write_preview_png(ct, labels, path)
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8
    height, width, _ = rgb.shape
    assert 100 <= height <= 1000 and 200 <= width <= 2000
    reddish, greenish, grey = colour_masks(rgb)
    assert reddish.sum() > 100 and greenish.sum() > 20
    assert grey.sum() > 0.5 * height * width
    # 0 HU in a (-160, 240) window is grey level 102.
    assert np.median(rgb[grey][:, 0]) == pytest.approx(102, abs=1)
    assert not [p for p in tmp_path.iterdir() if p.name != "preview.png"]


def test_radiological_orientation(tmp_path):
    ct, labels = phantom()
    write_preview_png(ct, labels, tmp_path / "p.png")
    rgb = read_rgb(tmp_path / "p.png")
    reddish, greenish, _ = colour_masks(rgb)
    half = rgb.shape[1] // 2
    axial_red, coronal_red = reddish[:, :half], reddish[:, half:]
    rows, cols = np.nonzero(axial_red)
    assert cols.mean() < axial_red.shape[1] / 2  # patient right on the image left
    assert rows.mean() < 0.5 * 50 * 0.8 / (60 * 0.8) * axial_red.shape[1]  # anterior up
    rows, cols = np.nonzero(coronal_red)
    assert rows.mean() < 40 * 2.0 / (60 * 0.8) * coronal_red.shape[1] / 2  # superior up
    assert cols.mean() < coronal_red.shape[1] / 2
    assert greenish[:, :half].any() and greenish[:, half:].any()


def test_storage_order_does_not_change_the_picture(tmp_path):
    ct, labels = phantom()
    write_preview_png(ct, labels, tmp_path / "reference.png")
    # The same anatomy stored as RAS-like (i -> R, j -> A) and with i/k permuted.
    flip = np.diag([-1.0, -1.0, 1.0])
    for name, direction, transform in (
        ("flipped", flip, lambda a: a[:, ::-1, ::-1]),
        ("permuted", np.array([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]]), lambda a: np.transpose(a, (2, 1, 0))),
    ):
        spacing = ct.spacing if name == "flipped" else ct.spacing[::-1]
        moved_ct = Volume(np.ascontiguousarray(transform(ct.array)), spacing, ct.origin, direction)
        moved_labels = Volume(np.ascontiguousarray(transform(labels.array)), spacing, ct.origin, direction)
        write_preview_png(moved_ct, moved_labels, tmp_path / f"{name}.png")
        np.testing.assert_array_equal(read_rgb(tmp_path / f"{name}.png"), read_rgb(tmp_path / "reference.png"))


def test_empty_labels_and_errors(tmp_path):
    ct, labels = phantom()
    write_preview_png(ct, labels.with_array(np.zeros_like(labels.array)), tmp_path / "empty.png")
    reddish, greenish, _ = colour_masks(read_rgb(tmp_path / "empty.png"))
    assert not reddish.any() and not greenish.any()
    with pytest.raises(InputError):
        write_preview_png(ct, Volume(labels.array, spacing=(1.0, 1.0, 1.0)), tmp_path / "bad.png")
    with pytest.raises(InputError):
        write_preview_png(ct, labels, tmp_path / "bad.png", window=(100, 100))


def test_real_lits_preview(tmp_path):
    label_path = real_data("lits117_crop_label.nii.gz")
    ct_path = real_data("lits117_crop_ct.nii.gz")
    labels = Volume.from_sitk(sitk.ReadImage(str(label_path)))
    ct = Volume.from_sitk(sitk.ReadImage(str(ct_path)))
    write_preview_png(ct, labels, tmp_path / "lits.png")
    reddish, greenish, _ = colour_masks(read_rgb(tmp_path / "lits.png"))
    assert reddish.sum() > 1000 and greenish.sum() > 100


def test_both_slices_pass_through_the_largest_lesion():
    """Two lesions far apart: their joint centre of mass lies in healthy liver, and
    slices through it showed no tumor at all."""
    from LiverTumorSegLib.preview import _focus

    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:35, 5:35, 5:35] = 1
    labels[8:14, 8:14, 8:14] = 2    # 216 voxels, near one corner
    labels[26:33, 26:33, 26:33] = 2  # 343 voxels, near the other
    s, p = _focus(labels)
    assert 26 <= s < 33 and 26 <= p < 33
    assert (labels[s] == 2).any() and (labels[:, p] == 2).any()
