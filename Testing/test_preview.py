"""Tests of LiverTumorSegLib.preview: a readable RGB PNG in radiological orientation."""

from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib import preview
from LiverTumorSegLib.errors import InputError, OutputError
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


def test_a_vector_ct_is_refused_with_an_input_error(tmp_path):
    """A 4D (vector) CT shares its first three axes with the labels; without the ndim
    check it failed deep inside numpy with a ValueError instead of a clear message."""
    ct, labels = phantom()
    vector = Volume(np.zeros(ct.array.shape + (3,), np.int16), ct.spacing, ct.origin, ct.direction)
    with pytest.raises(InputError, match="3D CT"):
        write_preview_png(vector, labels, tmp_path / "p.png")


def test_panel_sizes_follow_the_finest_in_plane_spacing_and_each_axis_in_mm(tmp_path):
    """Pixels are square and as fine as the finer in-plane spacing (here 1 mm); each panel
    axis is its extent in mm (S 11 x 2.6 = 28.6 mm -> 29 pixels). Guards against the
    coarser spacing, another axis's spacing, or truncation setting a panel's size."""
    shape = (11, 200, 200)  # (z, y, x); spacing i=1.0 (L), j=2.0 (P), k=2.6 (S)
    geometry = dict(spacing=(1.0, 2.0, 2.6))
    ct = Volume(np.zeros(shape, np.int16), **geometry)
    labels = Volume(np.zeros(shape, np.uint8), **geometry)
    write_preview_png(ct, labels, tmp_path / "p.png")
    rgb = read_rgb(tmp_path / "p.png")
    assert rgb.shape == (400, 200 + preview.GAP_PIXELS + 200, 3)  # axial: 400 mm of P, 200 mm of L
    drawn = rgb.any(axis=2)
    assert drawn[:, :200].all()
    coronal_rows = np.flatnonzero(drawn[:, 200 + preview.GAP_PIXELS:].any(axis=1))
    np.testing.assert_array_equal(coronal_rows, np.arange(29))


def test_focus_rounds_to_the_nearest_slice_on_the_s_and_p_axes():
    """The slices go through the lesion's centre of mass, rounded (5.75 -> 6, 10.75 -> 11),
    each on its own axis; truncation or the wrong axis's counts missed small lesions."""
    from LiverTumorSegLib.preview import _focus

    labels = np.zeros((10, 20, 30), np.uint8)
    for s, p, left in ((5, 10, 5), (6, 11, 5), (6, 11, 6), (6, 11, 7)):
        labels[s, p, left] = 2
    assert _focus(labels) == (6, 11)


def test_focus_of_empty_labels_is_the_middle_of_the_volume():
    """With nothing found, the slices go through the middle, not the (air) edge."""
    from LiverTumorSegLib.preview import _focus

    assert _focus(np.zeros((10, 20, 30), np.uint8)) == (5, 10)


def test_resample_aligns_pixel_centres_and_rounds_nearest():
    """Pixel-centre alignment: [0, 1] -> [0, .25, .75, 1] (not shifted by half a pixel);
    nearest-neighbour labels round to the nearest source pixel."""
    from LiverTumorSegLib.preview import _resample

    linear = _resample(np.array([[0.0, 1.0]], np.float32), (1, 4), linear=True)
    np.testing.assert_allclose(linear, [[0.0, 0.25, 0.75, 1.0]])
    np.testing.assert_array_equal(_resample(np.array([[1, 2]]), (1, 4), linear=False), [[1, 1, 2, 2]])
    np.testing.assert_array_equal(_resample(np.array([[0, 1, 2]]), (1, 2), linear=False), [[0, 2]])
    np.testing.assert_allclose(_resample(np.array([[0.0], [1.0]], np.float32), (4, 1), linear=True),
                               [[0.0], [0.25], [0.75], [1.0]])


def test_outline_is_the_ring_of_pixels_with_a_4_neighbour_outside():
    """Every side of a region is outlined (a dropped neighbour left one side unmarked)."""
    from LiverTumorSegLib.preview import _outline

    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    ring = mask.copy()
    ring[2:4, 2:4] = False
    np.testing.assert_array_equal(_outline(mask), ring)


def test_liver_and_tumor_fills_have_their_own_tints(tmp_path):
    """Parenchyma is tinted red over the grey, tumor green over that: the tumor tint must
    not spread over the whole liver."""
    ct, labels = phantom()
    write_preview_png(ct, labels, tmp_path / "p.png")
    rgb = read_rgb(tmp_path / "p.png").reshape(-1, 3).astype(int)
    grey = np.full(3, (0 + 160) / 400 * 255)  # 0 HU in the (-160, 240) window
    liver = grey * (1 - preview.LIVER_ALPHA) + np.array(preview.LIVER_RGB) * preview.LIVER_ALPHA
    tumor = liver * (1 - preview.TUMOR_ALPHA) + np.array(preview.TUMOR_RGB) * preview.TUMOR_ALPHA
    n_liver = np.all(rgb == np.round(liver), axis=1).sum()
    n_tumor = np.all(rgb == np.round(tumor), axis=1).sum()
    assert n_liver > 1000 and 50 < n_tumor < n_liver


def test_write_errors_become_output_errors(tmp_path):
    """Both an OS error (the folder is a file) and SimpleITK's RuntimeError (a format it
    cannot write) reach the user as an OutputError with advice, not a traceback."""
    ct, labels = phantom()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="writable output folder"):
        write_preview_png(ct, labels, tmp_path / "file" / "p.png")
    with pytest.raises(OutputError, match="writable output folder"):
        write_preview_png(ct, labels, tmp_path / "p.unknownformat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
