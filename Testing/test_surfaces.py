"""Tests of LiverTumorSegLib.surfaces: closed, outward meshes in LPS mm."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from LiverTumorSegLib import surfaces
from LiverTumorSegLib.errors import InputError, LiverTumorSegError
from LiverTumorSegLib.surfaces import (
    Mesh,
    face_normals,
    label_surface,
    mesh_volume_ml,
    surfaces_for_labels,
    write_obj,
    write_stl,
)
from LiverTumorSegLib.volume import Volume

ROTATION = np.array([
    [np.cos(0.4), -np.sin(0.4) * np.cos(0.3), np.sin(0.4) * np.sin(0.3)],
    [np.sin(0.4), np.cos(0.4) * np.cos(0.3), -np.cos(0.4) * np.sin(0.3)],
    [0.0, np.sin(0.3), np.cos(0.3)],
])
DIRECTIONS = {
    "identity": np.eye(3),
    "oblique": ROTATION,
    "flipped": np.diag([-1.0, 1.0, 1.0]),
    "lps_flip": np.diag([-1.0, -1.0, 1.0]),
    "oblique_flipped": ROTATION @ np.diag([1.0, 1.0, -1.0]),
}


def sphere(spacing: tuple, direction: np.ndarray, radius: float = 20.0) -> tuple:
    """Sphere of ``radius`` mm on a grid; returns (mask, geometry, centre in LPS mm)."""
    sp = np.asarray(spacing, dtype=float)
    n_xyz = (np.ceil(2 * radius / sp) + 6).astype(int)
    c = (n_xyz - 1) / 2.0
    k, j, i = np.indices(tuple(n_xyz[::-1]), dtype=np.float64)
    mask = ((i - c[0]) * sp[0]) ** 2 + ((j - c[1]) * sp[1]) ** 2 + ((k - c[2]) * sp[2]) ** 2 <= radius ** 2
    geometry = Volume(np.zeros(mask.shape, dtype=np.uint8), spacing=spacing, origin=(10.0, -20.0, 30.0),
                      direction=direction)
    centre = geometry.ijk_to_lps() @ np.append(c, 1.0)
    return mask, geometry, centre[:3]


def hide_modules(monkeypatch, prefix: str) -> None:
    """Make every module under ``prefix`` unimportable for the test."""
    for name in [prefix] + [n for n in sys.modules if n.startswith(prefix + ".")]:
        monkeypatch.setitem(sys.modules, name, None)


def assert_sphere_ok(mesh: Mesh, mask: np.ndarray, geometry: Volume, centre: np.ndarray) -> None:
    reference = mask.sum() * geometry.voxel_volume_ml
    assert mesh_volume_ml(mesh) == pytest.approx(reference, rel=0.03)
    faces_centre = mesh.vertices[mesh.faces].mean(axis=1)
    outward = np.einsum("ij,ij->i", face_normals(mesh), faces_centre - centre)
    assert np.mean(outward > 0) > 0.99
    assert mesh.vertices.dtype == np.float64 and mesh.faces.dtype == np.int64
    radii = np.linalg.norm(mesh.vertices - centre, axis=1)
    assert radii.max() < 20.0 + max(geometry.spacing)
    assert radii.min() > 20.0 - max(geometry.spacing)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5)])
@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_sphere_volume_and_orientation(spacing, direction):
    mask, geometry, centre = sphere(spacing, DIRECTIONS[direction])
    assert_sphere_ok(label_surface(mask, geometry), mask, geometry, centre)


@pytest.mark.parametrize("iterations", [10, 30])
def test_smoothing_preserves_volume(iterations):
    mask, geometry, centre = sphere((0.8, 0.8, 2.5), DIRECTIONS["oblique"])
    raw = label_surface(mask, geometry)
    smooth = label_surface(mask, geometry, smoothing_iterations=iterations)
    assert_sphere_ok(smooth, mask, geometry, centre)
    assert smooth.n_triangles == raw.n_triangles
    def spread(mesh: Mesh) -> float:
        return float(np.std(np.linalg.norm(mesh.vertices - centre, axis=1)))

    assert spread(smooth) < spread(raw)


def test_vtk_backend_when_skimage_missing(monkeypatch):
    pytest.importorskip("vtkmodules")
    calls = []
    original = surfaces._vtk_flying_edges

    def spy(padded):
        calls.append(padded.shape)
        return original(padded)

    monkeypatch.setattr(surfaces, "_vtk_flying_edges", spy)
    hide_modules(monkeypatch, "skimage")
    for direction in ("oblique", "oblique_flipped"):
        mask, geometry, centre = sphere((0.8, 0.8, 2.5), DIRECTIONS[direction])
        assert_sphere_ok(label_surface(mask, geometry), mask, geometry, centre)
        assert_sphere_ok(label_surface(mask, geometry, smoothing_iterations=10), mask, geometry, centre)
    assert len(calls) == 4


def test_no_backend_raises(monkeypatch):
    hide_modules(monkeypatch, "skimage")
    hide_modules(monkeypatch, "vtkmodules")
    mask, geometry, _ = sphere((2.0, 2.0, 2.0), np.eye(3), radius=6.0)
    with pytest.raises(LiverTumorSegError, match="scikit-image or VTK"):
        label_surface(mask, geometry)


def test_decimation():
    pytest.importorskip("vtkmodules")
    mask, geometry, centre = sphere((0.8, 0.8, 2.5), DIRECTIONS["oblique"])
    raw = label_surface(mask, geometry)
    mesh = label_surface(mask, geometry, smoothing_iterations=10, decimation=0.5)
    assert mesh.n_triangles == pytest.approx(raw.n_triangles / 2, rel=0.1)
    assert_sphere_ok(mesh, mask, geometry, centre)


def test_decimation_without_vtk_warns(monkeypatch):
    hide_modules(monkeypatch, "vtkmodules")
    mask, geometry, _ = sphere((2.0, 2.0, 2.0), np.eye(3), radius=8.0)
    raw = label_surface(mask, geometry)
    with pytest.warns(UserWarning, match="not decimated"):
        mesh = label_surface(mask, geometry, decimation=0.5)
    assert mesh.n_triangles == raw.n_triangles


def test_empty_mask_and_bad_input():
    geometry = Volume(np.zeros((5, 6, 7), dtype=np.uint8))
    assert label_surface(np.zeros((5, 6, 7), dtype=bool), geometry) is None
    with pytest.raises(InputError):
        label_surface(np.zeros((5, 6, 8), dtype=bool), geometry)
    with pytest.raises(LiverTumorSegError):
        label_surface(np.ones((5, 6, 7), dtype=bool), geometry, decimation=1.0)


def test_single_voxel_and_border_voxels_are_closed():
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[0, 0, 0] = True  # touches the volume border: padding must close it
    mask[2, 3, 4] = True
    mesh = label_surface(mask, Volume(mask.astype(np.uint8), spacing=(1.0, 2.0, 3.0)))
    assert mesh_volume_ml(mesh) > 0
    edges = np.sort(np.concatenate([mesh.faces[:, [0, 1]], mesh.faces[:, [1, 2]], mesh.faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert np.all(counts == 2)  # watertight: every edge shared by two triangles


def test_surfaces_for_labels_liver_includes_tumor():
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[5:25, 5:25, 5:25] = 1
    labels[10:15, 10:15, 10:15] = 2
    volume = Volume(labels, spacing=(1.5, 1.5, 2.0))
    meshes = surfaces_for_labels(volume)
    assert set(meshes) == {"liver", "tumor"}
    assert mesh_volume_ml(meshes["liver"]) == pytest.approx(20 ** 3 * volume.voxel_volume_ml, rel=0.03)
    assert mesh_volume_ml(meshes["tumor"]) == pytest.approx(5 ** 3 * volume.voxel_volume_ml, rel=0.1)
    only_liver = surfaces_for_labels(volume.with_array(np.minimum(labels, 1)))
    assert set(only_liver) == {"liver"}


def read_binary_stl(path) -> tuple:
    data = path.read_bytes()
    count = int(np.frombuffer(data[80:84], dtype="<u4")[0])
    records = np.frombuffer(data[84:], dtype=surfaces._STL_DTYPE, count=count)
    return data[:80], records


def test_stl_round_trip(tmp_path):
    mask, geometry, _ = sphere((0.8, 0.8, 2.5), DIRECTIONS["oblique_flipped"], radius=10.0)
    mesh = label_surface(mask, geometry)
    path = tmp_path / "out" / "liver.stl"
    write_stl(mesh, path)
    header, records = read_binary_stl(path)
    assert header.startswith(b"LiverTumorSeg SPACE=LPS") and len(header) == 80
    assert path.stat().st_size == 84 + 50 * mesh.n_triangles
    np.testing.assert_allclose(records["vertices"], mesh.vertices[mesh.faces], atol=1e-4)
    np.testing.assert_allclose(records["normal"], face_normals(mesh), atol=1e-5)
    assert not [p for p in path.parent.iterdir() if p.name != "liver.stl"]

    vtk_io = pytest.importorskip("vtkmodules.vtkIOGeometry")
    reader = vtk_io.vtkSTLReader()
    reader.SetFileName(str(path))
    reader.Update()
    assert reader.GetOutput().GetNumberOfCells() == mesh.n_triangles
    bounds = np.array(reader.GetOutput().GetBounds()).reshape(3, 2)
    np.testing.assert_allclose(bounds[:, 0], mesh.vertices.min(axis=0), atol=1e-4)
    np.testing.assert_allclose(bounds[:, 1], mesh.vertices.max(axis=0), atol=1e-4)


def test_obj_output(tmp_path):
    mask, geometry, _ = sphere((2.0, 2.0, 2.0), np.eye(3), radius=8.0)
    mesh = label_surface(mask, geometry)
    path = tmp_path / "tumor.obj"
    write_obj(mesh, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# SPACE=LPS"
    vertices = np.array([[float(v) for v in line.split()[1:]] for line in lines if line.startswith("v ")])
    faces = np.array([[int(v) for v in line.split()[1:]] for line in lines if line.startswith("f ")])
    np.testing.assert_allclose(vertices, mesh.vertices, atol=1e-5)
    np.testing.assert_array_equal(faces - 1, mesh.faces)


def test_smoothing_leaves_lesions_of_a_few_voxels_their_volume():
    """Ten Taubin passes shrank a one-voxel lesion to a point and a 2x2x2 one to 46 %;
    components under SMOOTH_MIN_VOXELS are now left as marching cubes made them, while
    a big one beside them is still smoothed."""
    geometry = Volume(np.zeros((30, 30, 30), np.uint8), spacing=(3.0, 3.0, 3.0))
    mask = np.zeros((30, 30, 30), bool)
    mask[3, 3, 3] = True                # one voxel
    mask[8:10, 8:10, 8:10] = True       # 2x2x2
    zz, yy, xx = np.mgrid[:30, :30, :30]
    mask |= (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 36  # a sphere of radius 6 voxels
    raw = label_surface(mask, geometry)
    smooth = label_surface(mask, geometry, smoothing_iterations=10)
    small = np.zeros_like(mask)
    small[3, 3, 3] = small[8:10, 8:10, 8:10] = True
    assert mesh_volume_ml(label_surface(small, geometry, smoothing_iterations=10)) == \
        pytest.approx(mesh_volume_ml(label_surface(small, geometry)), rel=1e-9)
    assert smooth.n_triangles == raw.n_triangles
    assert mesh_volume_ml(smooth) == pytest.approx(mesh_volume_ml(raw), rel=0.03)

    def sphere_spread(mesh: Mesh) -> float:  # the sphere's vertices lie within 25 mm of its centre (60 mm)
        distance = np.linalg.norm(mesh.vertices - 60.0, axis=1)
        return float(np.std(distance[distance < 25.0]))

    assert sphere_spread(smooth) < 0.8 * sphere_spread(raw)  # still smoothed


def test_negative_decimation_or_smoothing_is_refused():
    """A negative decimation or pass count was silently taken as 'none' (or recursed into
    the small-lesion split) instead of being reported as a bad parameter."""
    mask, geometry, _ = sphere((2.0, 2.0, 2.0), np.eye(3), radius=6.0)
    with pytest.raises(LiverTumorSegError, match="decimation"):
        label_surface(mask, geometry, decimation=-0.2)
    with pytest.raises(LiverTumorSegError, match="smoothing_iterations"):
        label_surface(mask, geometry, smoothing_iterations=-1)


def test_a_component_of_exactly_smooth_min_voxels_is_smoothed_one_fewer_is_not():
    """The cut-off is 'fewer than SMOOTH_MIN_VOXELS': an off-by-one left 3x3x3 lesions raw."""
    geometry = Volume(np.zeros((9, 9, 18), np.uint8), spacing=(2.0, 2.0, 2.0))
    cube = np.zeros((9, 9, 18), bool)
    cube[3:6, 3:6, 3:6] = True
    assert cube.sum() == surfaces.SMOOTH_MIN_VOXELS
    notched = np.zeros_like(cube)
    notched[3:6, 3:6, 12:15] = True
    notched[3, 3, 12] = False
    for mask, smoothed in ((cube, True), (notched, False)):
        raw = label_surface(mask, geometry)
        smooth = label_surface(mask, geometry, smoothing_iterations=5)
        assert smooth.n_triangles == raw.n_triangles
        assert (not np.allclose(np.sort(smooth.vertices, axis=0), np.sort(raw.vertices, axis=0))) == smoothed


def test_decimation_applies_also_when_small_components_are_split_off():
    """With smoothing on, a mask holding a lesion under SMOOTH_MIN_VOXELS takes a separate
    path; decimation was skipped there, so one tiny lesion doubled the file size."""
    pytest.importorskip("vtkmodules")
    mask, geometry, centre = sphere((2.0, 2.0, 2.0), np.eye(3), radius=12.0)
    mask[0, 0, 0] = True  # a one-voxel lesion far from the sphere
    raw = label_surface(mask, geometry)
    mesh = label_surface(mask, geometry, smoothing_iterations=5, decimation=0.5)
    assert mesh.n_triangles < 0.6 * raw.n_triangles
    assert mesh_volume_ml(mesh) == pytest.approx(mask.sum() * geometry.voxel_volume_ml, rel=0.05)


def test_the_chosen_backend_is_used_for_both_parts_of_a_small_lesion_split(monkeypatch):
    """label_surface(backend=...) recursed with the default backend for the big or the
    small components, so the user's choice applied to none or only part of the mesh."""
    calls = []
    original = surfaces._marching_cubes

    def spy(padded, backend):
        calls.append(backend)
        return original(padded, "auto")

    monkeypatch.setattr(surfaces, "_marching_cubes", spy)
    mask, geometry, _ = sphere((2.0, 2.0, 2.0), np.eye(3), radius=8.0)
    mask[0, 0, 0] = True
    label_surface(mask, geometry, smoothing_iterations=3, backend="vtk")
    assert calls == ["vtk", "vtk"]


@pytest.mark.parametrize("direction", ["identity", "lps_flip"])
def test_mesh_bounds_are_the_voxel_box_in_lps(direction):
    """The crop offset is added per axis (i, j, k): swapped axes put an off-centre
    object in the wrong place although its shape and volume stay right."""
    labels = np.zeros((10, 20, 30), np.uint8)
    labels[2:5, 10:14, 20:27] = 1  # k 2..4, j 10..13, i 20..26
    volume = Volume(labels, spacing=(1.0, 2.0, 3.0), origin=(-7.0, 11.0, 5.0), direction=DIRECTIONS[direction])
    mesh = label_surface(labels > 0, volume)
    corners = np.array([[i, j, k, 1.0] for i in (19.5, 26.5) for j in (9.5, 13.5) for k in (1.5, 4.5)])
    lps = (volume.ijk_to_lps() @ corners.T).T[:, :3]
    np.testing.assert_allclose(mesh.vertices.min(axis=0), lps.min(axis=0), atol=1e-6)
    np.testing.assert_allclose(mesh.vertices.max(axis=0), lps.max(axis=0), atol=1e-6)


def test_liver_surface_covers_a_tumor_at_the_liver_border():
    """The liver surface is the whole organ (labels 1 and 2): a liver class of label 1
    alone left a notch where a lesion reaches the liver's surface."""
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[5:25, 5:25, 5:25] = 1
    labels[5:13, 5:13, 5:13] = 2  # a lesion in the liver's corner, reaching its surface
    volume = Volume(labels, spacing=(1.5, 1.5, 2.0))
    meshes = surfaces_for_labels(volume)
    assert mesh_volume_ml(meshes["liver"]) == pytest.approx(20 ** 3 * volume.voxel_volume_ml, rel=0.03)
    assert meshes["liver"].vertices.min(axis=0) == pytest.approx(volume.ijk_to_lps()[:3, :3] @ [4.5, 4.5, 4.5])


def test_surfaces_for_labels_applies_the_smoothing_asked_for():
    """The exported liver.stl must be smoothed when asked (the smoothing was dropped on
    the way from surfaces_for_labels to label_surface)."""
    labels = np.zeros((24, 24, 24), dtype=np.uint8)
    labels[4:20, 4:20, 4:20] = 1
    volume = Volume(labels, spacing=(2.0, 2.0, 2.0))
    smooth = surfaces_for_labels(volume, smoothing_iterations=5)["liver"]
    expected = label_surface(labels > 0, volume, smoothing_iterations=5)
    np.testing.assert_allclose(smooth.vertices, expected.vertices)
    assert not np.allclose(smooth.vertices, label_surface(labels > 0, volume).vertices)


def test_taubin_umbrella_averages_each_neighbour_once_and_stays_finite():
    """On an open mesh an edge shared by two triangles must not weigh double, and a
    vertex used by no triangle must neither turn the result into NaN (0/0) nor move
    (it has no neighbours to move towards)."""
    vertices = np.array([[0.0, 0, 0], [4, 0, 0], [4, 4, 0], [0, 4, 1], [9, 9, 9]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])  # vertex 4 is unused
    neighbours = {0: [1, 2, 3], 1: [0, 2], 2: [0, 1, 3], 3: [0, 2], 4: []}

    def laplacian(p):
        return np.array([p[neighbours[v]].mean(axis=0) - p[v] if neighbours[v] else np.zeros(3)
                         for v in range(len(p))])

    expected = vertices.copy()
    expected += surfaces.TAUBIN_LAMBDA * laplacian(expected)
    expected += surfaces.TAUBIN_MU * laplacian(expected)
    smoothed = surfaces.taubin_smooth(Mesh(vertices=vertices, faces=faces), 1)
    np.testing.assert_allclose(smoothed.vertices, expected, atol=1e-12)
    assert np.isfinite(smoothed.vertices).all()
    np.testing.assert_array_equal(smoothed.faces, faces)


def test_taubin_smoothing_does_not_shrink_a_small_lesion():
    """The mu step (|mu| > lambda) is what keeps the volume: with mu = -lambda, 30 passes
    shrank a 6 mm lesion by 4 %."""
    mask, geometry, _ = sphere((0.8, 0.8, 2.5), DIRECTIONS["oblique"], radius=6.0)
    smooth = label_surface(mask, geometry, smoothing_iterations=30)
    assert mesh_volume_ml(smooth) == pytest.approx(mask.sum() * geometry.voxel_volume_ml, rel=0.01)


def test_face_normals_of_degenerate_triangles_are_zero():
    """A zero-area triangle (marching cubes can make them) must get a zero normal in the
    STL, not NaN."""
    mesh = Mesh(vertices=np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0]]),
                faces=np.array([[0, 1, 2], [0, 1, 3]]))
    normals = face_normals(mesh)
    np.testing.assert_array_equal(normals, [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_decimate_returns_outward_faces_even_for_an_inside_out_input():
    """decimate() re-checks the winding after VTK: without it an inside-out mesh came back
    with inward normals and a negative volume."""
    pytest.importorskip("vtkmodules")
    mask, geometry, _ = sphere((2.0, 2.0, 2.0), np.eye(3), radius=8.0)
    mesh = label_surface(mask, geometry)
    inside_out = Mesh(vertices=mesh.vertices, faces=np.ascontiguousarray(mesh.faces[:, ::-1]))
    decimated = surfaces.decimate(inside_out, 0.5)
    assert decimated.n_triangles < 0.6 * mesh.n_triangles
    assert mesh_volume_ml(decimated) == pytest.approx(mesh_volume_ml(mesh), rel=0.05)
