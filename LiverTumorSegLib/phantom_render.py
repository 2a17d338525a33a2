"""Rendering of a phantom :class:`~.phantom_anatomy.Anatomy` onto a voxel grid.

The anatomy is evaluated at the physical position of every voxel, so any spacing,
size or orientation (direction matrix) gives the same patient. The volume is processed
in slabs along the k axis (the first array axis) to bound memory, and each structure is
evaluated only inside the part of the slab that covers its bounding box.

Intensities are painted back to front with a soft edge one voxel wide (partial-volume
effect); labels are 0 background, 1 liver, 2 tumour (tumour voxels are always liver
voxels too).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .phantom_anatomy import Anatomy
from .phantom_shapes import F32, capsule_sdf, ellipse_sdf

SLAB_VOXELS = 2_000_000
_FAR = F32(1.0e4)


@dataclass
class Grid:
    """A voxel grid: ``shape`` (x, y, z voxels), ``spacing`` (x, y, z mm), LPS ``origin`` (mm) and
    ``direction`` (3x3, columns = i, j, k axes in LPS), as in :class:`~.volume.Volume`."""

    shape: tuple
    spacing: tuple
    origin: tuple
    direction: np.ndarray


class _Slab:
    """Patient-frame coordinates (mm, float32, (k, j, i) arrays) of slices k0:k1 of a grid."""

    def __init__(self, grid: Grid, centre_lps: tuple, k0: int, k1: int) -> None:
        self.grid, self.k0, self.k1 = grid, k0, k1
        ni, nj = grid.shape[0], grid.shape[1]
        self.m = np.asarray(grid.direction, dtype=np.float64) @ np.diag(grid.spacing)
        self.o = np.asarray(grid.origin, dtype=np.float64) - np.asarray(centre_lps, dtype=np.float64)
        i = np.arange(ni, dtype=np.float64)
        j = np.arange(nj, dtype=np.float64)
        k = np.arange(k0, k1, dtype=np.float64)
        coords = []
        for r in range(3):
            ck = (self.o[r] + self.m[r, 2] * k).astype(F32)[:, None, None]
            cj = (self.m[r, 1] * j).astype(F32)[None, :, None]
            ci = (self.m[r, 0] * i).astype(F32)[None, None, :]
            coords.append((ck + cj) + ci)
        self.x, self.y, self.z = coords
        self.shape = self.x.shape

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple | None:
        """Slices (k, j, i) of this slab covering the patient-frame box [lo, hi] (mm), or None."""
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        ijk = np.linalg.solve(self.m, (corners - self.o).T)
        mn = np.floor(ijk.min(axis=1)).astype(np.int64)
        mx = np.ceil(ijk.max(axis=1)).astype(np.int64) + 1
        limits = ((0, self.grid.shape[0]), (0, self.grid.shape[1]), (self.k0, self.k1))
        sl = []
        for a in (2, 1, 0):
            lo_a, hi_a = max(mn[a], limits[a][0]), min(mx[a], limits[a][1])
            if hi_a <= lo_a:
                return None
            off = self.k0 if a == 2 else 0
            sl.append(slice(int(lo_a - off), int(hi_a - off)))
        return tuple(sl)

    def at(self, sl: tuple) -> tuple:
        """Coordinate views (x, y, z) of a sub-block."""
        return self.x[sl], self.y[sl], self.z[sl]

    def sample(self, img: sitk.Image) -> np.ndarray:
        """A physical-space image (e.g. a texture lattice) resampled linearly on this slab."""
        g = self.grid
        origin = np.asarray(g.origin) + self.m @ np.array([0.0, 0.0, float(self.k0)])
        out = sitk.Resample(img, (int(g.shape[0]), int(g.shape[1]), int(self.k1 - self.k0)), sitk.Transform(),
                            sitk.sitkLinear, tuple(float(v) for v in origin), tuple(float(s) for s in g.spacing),
                            tuple(float(v) for v in np.asarray(g.direction).ravel()), 0.0, sitk.sitkFloat32)
        return sitk.GetArrayViewFromImage(out).copy()


def _paint(img: np.ndarray, sl: tuple, sdf: np.ndarray, value, width: float) -> None:
    """Blend ``value`` into ``img[sl]`` where ``sdf`` < 0, with a soft edge ``width`` mm wide."""
    a = sdf * F32(-1.0 / width)
    a += F32(0.5)
    np.clip(a, F32(0.0), F32(1.0), out=a)
    view = img[sl] if sl is not None else img
    a *= value - view
    view += a


_TEXTURES = ((4.0, 1.0), (6.0, 1.5), (5.0, 1.2))
_TILE = 8


@functools.lru_cache(maxsize=None)
def _smoothed_std(sigma: float) -> float:
    """Standard deviation of unit white noise after Gaussian smoothing (sigma in voxels)."""
    noise = np.random.default_rng(12345).standard_normal((64, 64, 64), dtype=np.float32)
    arr = sitk.GetArrayViewFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(noise), sigma))
    return float(np.std(arr[16:-16, 16:-16, 16:-16]))


@dataclass
class Textures:
    """Smooth unit-variance noise fields fixed in space (fine, coarse, gas), 3 components.

    Each field lives on a lattice fixed in the patient frame (``lo`` in mm); its white
    noise is drawn in tiles of slices seeded by (seed, component, tile), so any z range
    can be made on demand and gives the same texture for every voxel grid.
    """

    seed: int
    lo: np.ndarray
    hi: np.ndarray
    centre_lps: tuple

    def images(self, z_lo: float, z_hi: float) -> list:
        """The fields as SimpleITK images (LPS) covering patient-frame z in [z_lo, z_hi] mm."""
        out = []
        for c, (step, sigma) in enumerate(_TEXTURES):
            nx, ny = (int(np.ceil((self.hi[a] - self.lo[a]) / step)) + 1 for a in (0, 1))
            margin = int(np.ceil(4 * sigma)) + 1
            n0 = int(np.floor((z_lo - self.lo[2]) / step)) - margin
            n1 = int(np.ceil((z_hi - self.lo[2]) / step)) + margin + 1
            t0, t1 = n0 // _TILE, -(-n1 // _TILE)
            tiles = [np.random.default_rng([self.seed, c, t + 2**20]).standard_normal((_TILE, ny, nx), dtype=F32)
                     for t in range(t0, t1)]
            noise = np.concatenate(tiles)[n0 - t0 * _TILE:n1 - t0 * _TILE]
            img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(noise), sigma)
            img = img * (1.0 / _smoothed_std(sigma))
            img.SetSpacing((step, step, step))
            img.SetOrigin(tuple(float(v) for v in np.asarray(self.centre_lps) + self.lo + (0.0, 0.0, n0 * step)))
            out.append(img)
        return out


def make_textures(an: Anatomy, seed: int) -> Textures:
    """The texture fields of a patient: lattices over the body cross-section (mm)."""
    b = an.body
    lo = np.array([-b.a * 1.1 - 20, -b.b_ant * 1.1 - 20, 0.0])
    hi = np.array([b.a * 1.1 + 20, b.b_post * 1.1 + 20, 0.0])
    return Textures(seed=int(seed), lo=lo, hi=hi, centre_lps=an.centre_lps)


def render(an: Anatomy, grid: Grid, textures: Textures, noise_hu: float, rng: np.random.Generator) -> tuple:
    """Render ``an`` on ``grid``: (int16 HU array, uint8 label array), both indexed (z, y, x)."""
    nx, ny, nz = (int(v) for v in grid.shape)
    corners = np.array([[a, b, c] for a in (0, nx - 1) for b in (0, ny - 1) for c in (0, nz - 1)], dtype=np.float64)
    z_phys = (corners * np.asarray(grid.spacing)) @ np.asarray(grid.direction)[2] + grid.origin[2] - an.centre_lps[2]
    tex_images = textures.images(float(z_phys.min()), float(z_phys.max()))
    image = np.empty((nz, ny, nx), dtype=np.int16)
    labels = np.empty((nz, ny, nx), dtype=np.uint8)
    width = max(0.5, float(np.prod(grid.spacing)) ** (1.0 / 3.0))
    step = max(1, SLAB_VOXELS // max(1, nx * ny))
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        slab = _Slab(grid, an.centre_lps, k0, k1)
        img, lab = _render_slab(an, slab, [slab.sample(t) for t in tex_images], width)
        if noise_hu > 0:
            img += rng.standard_normal(img.shape, dtype=np.float32) * F32(noise_hu)
        np.clip(img, -1024, 3071, out=img)
        np.rint(img, out=img)
        image[k0:k1] = img
        labels[k0:k1] = lab
    return image, labels


def _render_slab(an: Anatomy, s: _Slab, tex: list, w: float) -> tuple:
    """Float32 HU and uint8 labels of one slab, without noise (``w``: edge width, mm)."""
    hu = an.hu
    x, y, z = s.x, s.y, s.z
    t0, t1, t2 = tex
    img = np.full(s.shape, -1000.0, dtype=F32)
    lab = np.zeros(s.shape, dtype=np.uint8)
    depth, fat, wall = an.walls(x, y, z)
    zd = an.diaphragm.height(x, y)
    _paint(img, None, -depth, hu["fat"] + F32(6.0) * t1, w)
    _paint(img, None, fat - depth, hu["muscle"] + F32(4.0) * t0, w)
    cavity = wall - depth
    mix = np.clip((t1 - F32(hu["bowel_threshold"])) * F32(1.5), F32(0.0), F32(1.0))
    gas = np.clip((t2 - F32(hu["gas_threshold"])) * F32(3.0), F32(0.0), F32(1.0)) * mix
    belly = hu["fat"] + F32(5.0) * t0 + mix * F32(hu["bowel"] - hu["fat"]) + gas * F32(-1000.0 - hu["bowel"])
    _paint(img, None, np.maximum(cavity, z - zd + F32(3.0)), belly, w)
    _paint(img, None, np.maximum(cavity, zd + F32(3.0) - z), hu["lung"] + F32(25.0) * t1, w)
    del mix, gas, belly
    _paint_muscles(an, s, img, depth, fat, zd, w)
    _paint_organs(an, s, img, tex, cavity, zd, w)
    _paint_liver(an, s, img, lab, tex, depth, wall, w)
    _paint_bones(an, s, img, lab, depth, fat, w)
    return img, lab


def _paint_muscles(an: Anatomy, s: _Slab, img: np.ndarray, depth, fat, zd, w: float) -> None:
    """Back muscles, psoas and the heart (above the diaphragm)."""
    hu, sp = an.hu, an.spine
    x, y = s.x, s.y
    ra, rb = an.back_muscle
    back = ellipse_sdf(x, y - F32(an.body.y_flat), ra, rb)
    _paint(img, None, np.maximum(back, fat - depth), hu["muscle"], w)
    zk = an.kidneys[0][0].shape.centre[2]
    sl = s.box(np.array([-sp.rx - 60, sp.y_body - 40, -1e4]), np.array([sp.rx + 60, sp.y_body + 40, zk]))
    if sl is not None:
        xs, ys, zs = s.at(sl)
        r = np.clip((F32(zk) - zs) * F32(0.22), F32(0.0), F32(24.0))
        dx = np.abs(xs) - (F32(sp.rx + 3.0) + r)
        dy = ys - sp.y_centre(zs)
        _paint(img, sl, np.sqrt(dx * dx + dy * dy) - r, hu["muscle"], w)
    heart = an.heart
    sl = s.box(*heart.bounds(8.0))
    if sl is not None:
        xs, ys, zs = s.at(sl)
        d = np.maximum(heart.sdf(xs, ys, zs), zd[sl] + F32(4.0) - zs)
        _paint(img, sl, d - F32(6.0), hu["fat"], w)
        _paint(img, sl, d, hu["blood"], w)


def _paint_organs(an: Anatomy, s: _Slab, img: np.ndarray, tex: list, cavity, zd, w: float) -> None:
    """Kidneys (with perirenal and sinus fat), spleen and stomach (wall, fluid, gas)."""
    hu = an.hu
    t0 = tex[0]
    for organ, sinus in an.kidneys:
        sl = s.box(*organ.bounds(12.0))
        if sl is None:
            continue
        xs, ys, zs = s.at(sl)
        d = organ.sdf(xs, ys, zs)
        _paint(img, sl, np.maximum(d - F32(10.0), cavity[sl]), hu["fat"], w)
        _paint(img, sl, d, hu["cortex"] + F32(3.0) * t0[sl], w)
        _paint(img, sl, d + F32(7.0), hu["medulla"], w)
        _paint(img, sl, np.maximum(sinus.sdf(xs, ys, zs), d + F32(2.0)), hu["fat"] + F32(20.0), w)
    sp = an.spleen
    sl = s.box(*sp.bounds(2.0))
    if sl is not None:
        xs, ys, zs = s.at(sl)
        d = np.maximum(sp.sdf(xs, ys, zs), cavity[sl] + F32(1.0))
        np.maximum(d, zs - zd[sl] + F32(4.0), out=d)
        np.maximum(d, F32(3.0) - an.kidneys[1][0].sdf(xs, ys, zs), out=d)
        _paint(img, sl, d, hu["spleen"] + F32(4.0) * t0[sl], w)
    st = an.stomach
    sl = s.box(*st.bounds(2.0))
    if sl is not None:
        xs, ys, zs = s.at(sl)
        d = np.maximum(st.sdf(xs, ys, zs), cavity[sl] + F32(1.0))
        np.maximum(d, zs - zd[sl] + F32(4.0), out=d)
        _paint(img, sl, d, hu["stomach_wall"], w)
        d += F32(4.0)
        _paint(img, sl, d, hu["stomach_fluid"] + F32(3.0) * t0[sl], w)
        if an.gas_y is not None:
            _paint(img, sl, np.maximum(d, ys - F32(an.gas_y)), -1000.0, w)


def _paint_liver(an: Anatomy, s: _Slab, img: np.ndarray, lab: np.ndarray, tex: list, depth, wall,
                 w: float) -> None:
    """Liver (label 1), gallbladder, hepatic vessels, IVC, aorta and tumours (label 2)."""
    hu = an.hu
    t0, t2 = tex[0], tex[2]
    liver = np.full(s.shape, _FAR, dtype=F32)
    sl = s.box(an.liver_lo, an.liver_hi)
    if sl is not None:
        xs, ys, zs = s.at(sl)
        d = an.liver_sdf(xs, ys, zs, depth[sl], wall[sl])
        liver[sl] = d
        _paint(img, sl, d, hu["liver"] + F32(hu["liver_texture"]) * t0[sl], w)
        lab[sl][d < 0] = 1
    gb = an.gallbladder
    if gb is not None:
        sl = s.box(*gb.bounds(2.0))
        if sl is not None:
            _paint(img, sl, gb.sdf(*s.at(sl)), hu["gallbladder"], w)
    for p0, p1, r in an.vessels:
        sl = s.box(np.minimum(p0, p1) - r - 2, np.maximum(p0, p1) + r + 2)
        if sl is not None:
            d = np.maximum(capsule_sdf(*s.at(sl), p0, p1, r), liver[sl] + F32(1.0))
            _paint(img, sl, d, hu["vessel"], w)
    for organ, value in ((an.ivc_sdf(s.x, s.y), hu["ivc"]), (an.aorta_sdf(s.x, s.y), hu["blood"])):
        _paint(img, None, organ, value, w)
        lab[organ < 0] = 0
    tw = max(w, 1.5)
    for t in an.tumours:
        sl = s.box(*t.organ.bounds(2.0))
        if sl is None:
            continue
        d = t.organ.sdf(*s.at(sl))
        _paint(img, sl, np.maximum(d, liver[sl]), t.hu + F32(4.0) * t2[sl], tw)
        if t.core_hu is not None:
            _paint(img, sl, d + F32(0.35 * t.diameter_mm), t.core_hu, tw)
        sub = lab[sl]
        sub[(d < 0) & (sub == 1)] = 2


def _paint_bones(an: Anatomy, s: _Slab, img: np.ndarray, lab: np.ndarray, depth, fat, w: float) -> None:
    """Spine (discs, vertebral bodies, arches, canal) and ribs; bone is never labelled."""
    hu, sp = an.hu, an.spine
    reach = sp.ry + 2 * sp.canal_r + sp.process_len + 12
    sl = s.box(np.array([-sp.transverse_x - 2, sp.y_body - sp.ry - 2 - 20, -1e4]),
               np.array([sp.transverse_x + 2, sp.y_body + reach + 20, 1e4]))
    if sl is not None:
        xs, ys, zs = s.at(sl)
        p = sp.parts(xs, ys, zs)
        inside = depth[sl] - fat[sl] - F32(3.0)
        bone = np.where(p["cortex"] < 2.0, F32(hu["cortical"]), F32(hu["cancellous"]))
        _paint(img, sl, p["disc"], hu["disc"], w)
        _paint(img, sl, p["body"], bone, w)
        _paint(img, sl, np.maximum(p["arch"], -inside), hu["arch"], w)
        _paint(img, sl, p["canal"], hu["csf"], w)
        sub = lab[sl]
        sub[(p["body"] < 0) | (p["disc"] < 0) | (p["arch"] < 0)] = 0
    ribs, body = an.ribs, an.body
    centre = fat + F32(0.5 * body.muscle)
    rel = depth - centre
    band = (rel > F32(-ribs.half_radial - 2.0)) & (rel < F32(ribs.half_radial + ribs.posterior_depth + 2.0))
    band &= s.z < F32(ribs.z_lowest + ribs.n * ribs.period + ribs.half_height)
    band &= s.z > F32(ribs.z_lowest - ribs.drop - ribs.half_height)
    del rel
    idx = np.nonzero(band)
    if idx[0].size:
        d = ribs.sdf(s.x[idx], s.y[idx], s.z[idx], depth[idx], centre[idx], body.a, body.b_ant)
        v = img[idx]
        a = np.clip(F32(0.5) - d / F32(w), F32(0.0), F32(1.0))
        img[idx] = v + a * (F32(hu["rib"]) - v)
        lab[idx] = np.where(d < 0, np.uint8(0), lab[idx])
