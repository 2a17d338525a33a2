"""Random anatomy of the synthetic abdominal CT phantom (parameters in mm and HU).

:func:`draw_anatomy` draws one patient from a random generator: body, spine, ribs,
diaphragm, liver (a smooth union of three lobes deformed by a random field), spleen,
kidneys, stomach, heart, great vessels, hepatic vessels, an optional gallbladder and
0 to several liver tumours. All positions are in the patient frame of
:mod:`.phantom_shapes` (LPS axes, mm, origin at the body centre at liver level);
``Anatomy.centre_lps`` is where that origin lies in scanner LPS coordinates. Nothing
here depends on the voxel grid, so every grid renders the same anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import LiverTumorSegError
from .phantom_shapes import (
    F32,
    Body,
    Diaphragm,
    Ellipsoid,
    Ribs,
    Spine,
    Waves,
    draw_waves,
    ellipse_sdf,
    random_rotation,
    rotation_matrix,
    smax,
    smin,
)

LATTICE_MM = 4.0


class PhantomError(LiverTumorSegError, ValueError):
    """An argument of the phantom generator is out of range (also a ValueError)."""


@dataclass
class Organ:
    """An ellipsoid deformed by a smooth random field (mm)."""

    shape: Ellipsoid
    waves: Waves

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate signed distance in mm (negative inside)."""
        d = self.shape.sdf(x, y, z)
        d += self.waves(x, y, z)
        return d

    def bounds(self, margin: float = 0.0) -> tuple:
        """Bounding box (lo, hi) in mm, grown by ``margin`` mm."""
        return self.shape.bounds(margin + self.waves.max_abs)


@dataclass
class Tumour:
    """A liver tumour: an irregular spheroid with its CT number (HU)."""

    organ: Organ
    diameter_mm: float
    kind: str
    hu: float
    core_hu: float | None = None


@dataclass
class Anatomy:
    """One synthetic patient. Lengths in mm (patient frame), intensities in HU.

    ``kidneys`` holds (kidney, renal sinus) pairs, right kidney first; ``aorta`` is
    (x, y, radius) and ``ivc`` (x, y, x radius, y radius) of vertical cylinders;
    ``back_muscle`` the (x, y) radii of the paraspinal muscle block; ``gas_y`` the
    air-fluid level in the stomach (air at smaller y, i.e. anterior, patient supine);
    ``hu`` the CT numbers and ``phase`` "plain" or "contrast". ``liver_lo``/``liver_hi``,
    ``vessels`` (p0, p1, radius) and ``tumours`` are set by :func:`finish_anatomy`.
    """

    centre_lps: tuple
    body: Body
    diaphragm: Diaphragm
    spine: Spine
    ribs: Ribs
    back_muscle: tuple
    liver_lobes: list
    liver_impression: Ellipsoid
    liver_waves: Waves
    spleen: Organ
    stomach: Organ
    gas_y: float | None
    kidneys: list
    heart: Ellipsoid
    aorta: tuple
    ivc: tuple
    gallbladder: Ellipsoid | None
    hu: dict
    phase: str
    liver_lo: np.ndarray = field(default_factory=lambda: np.zeros(3))
    liver_hi: np.ndarray = field(default_factory=lambda: np.zeros(3))
    vessels: list = field(default_factory=list)
    tumours: list = field(default_factory=list)

    def walls(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple:
        """(depth below skin, fat thickness, depth of the inner muscle wall), all mm."""
        depth = self.body.depth(x, y, z)
        fat = self.body.fat_thickness(x, y, z)
        return depth, fat, fat + F32(self.body.muscle)

    def liver_sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, depth: np.ndarray | None = None,
                  wall: np.ndarray | None = None) -> np.ndarray:
        """Approximate signed distance to the liver surface in mm (negative inside)."""
        k = 25.0
        lobes = self.liver_lobes
        d = smin(smin(lobes[0].sdf(x, y, z), lobes[1].sdf(x, y, z), k), lobes[2].sdf(x, y, z), k)
        d = smax(d, -self.liver_impression.sdf(x, y, z), 15.0)
        d += self.liver_waves(x, y, z)
        if depth is None:
            depth, _, wall = self.walls(x, y, z)
        np.maximum(d, wall + F32(2.0) - depth, out=d)
        np.maximum(d, z - self.diaphragm.height(x, y) + F32(4.0), out=d)
        np.maximum(d, F32(4.0) - self.kidneys[0][0].sdf(x, y, z), out=d)
        np.maximum(d, F32(4.0) - self.stomach.sdf(x, y, z), out=d)
        if self.gallbladder is not None:
            np.maximum(d, F32(1.0) - self.gallbladder.sdf(x, y, z), out=d)
        sp = self.spine
        np.maximum(d, -ellipse_sdf(x, y - sp.y_centre(z), sp.rx + 8.0, sp.ry + 10.0), out=d)
        np.maximum(d, F32(2.0) - self.ivc_sdf(x, y), out=d)
        return d

    def ivc_sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance in mm to the inferior vena cava (a vertical elliptic cylinder)."""
        cx, cy, rx, ry = self.ivc
        return ellipse_sdf(x - F32(cx), y - F32(cy), rx, ry)

    def aorta_sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance in mm to the aorta (a vertical cylinder)."""
        cx, cy, r = self.aorta
        dx, dy = x - F32(cx), y - F32(cy)
        return np.sqrt(dx * dx + dy * dy) - F32(r)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _rot_z(deg: float) -> np.ndarray:
    return rotation_matrix((0.0, 0.0, 1.0), np.radians(deg))


def _draw_hu(rng: np.random.Generator) -> tuple:
    phase = "contrast" if rng.random() < 0.5 else "plain"
    liver = _u(rng, 50, 64)
    hu = {
        "fat": _u(rng, -110, -85), "muscle": _u(rng, 40, 58), "liver": liver, "spleen": _u(rng, 44, 58),
        "bowel": _u(rng, 15, 40), "lung": _u(rng, -880, -820), "gallbladder": _u(rng, 0, 20),
        "stomach_fluid": _u(rng, 5, 25), "stomach_wall": _u(rng, 35, 50), "disc": _u(rng, 70, 100),
        "cancellous": _u(rng, 160, 280), "cortical": _u(rng, 650, 950), "arch": _u(rng, 450, 650),
        "rib": _u(rng, 400, 650), "csf": _u(rng, 5, 20), "liver_texture": _u(rng, 3, 7),
        "bowel_threshold": _u(rng, -0.6, 0.5), "gas_threshold": _u(rng, 1.2, 2.0),
    }
    if phase == "plain":
        hu.update(blood=_u(rng, 35, 50), ivc=_u(rng, 35, 50), vessel=liver - _u(rng, 8, 18),
                  cortex=_u(rng, 28, 38), medulla=_u(rng, 22, 32))
    else:
        hu.update(blood=_u(rng, 150, 280), ivc=_u(rng, 60, 120), vessel=liver + _u(rng, 25, 60),
                  cortex=_u(rng, 120, 200), medulla=_u(rng, 50, 90))
    return hu, phase


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy (without tumours) from ``rng``; lengths in mm."""
    centre = (_u(rng, -15, 15), _u(rng, -40, 40), _u(rng, -600, 200))
    a, b_ant, b_post = _u(rng, 140, 172), _u(rng, 100, 128), _u(rng, 90, 110)
    body = Body(a=a, b_ant=b_ant, b_post=b_post, y_flat=b_post - _u(rng, 5, 15), swell=_u(rng, 0.02, 0.06),
                swell_wavelength=_u(rng, 400, 700), swell_phase=_u(rng, 0, 2 * np.pi),
                waves=draw_waves(rng, 3, (80, 250), _u(rng, 2, 5)), fat=_u(rng, 8, 38),
                fat_waves=draw_waves(rng, 3, (60, 200), 0.25), muscle=_u(rng, 9, 14))
    zr = _u(rng, 70, 85)
    diaphragm = Diaphragm(right=(_u(rng, -80, -60), _u(rng, -10, 10), zr),
                          left=(_u(rng, 55, 75), _u(rng, 0, 20), zr - _u(rng, 8, 20)),
                          curv_right=_u(rng, 60, 90), curv_left=_u(rng, 60, 90))
    zl = diaphragm.left[2]
    spine = Spine(y_body=b_post - _u(rng, 68, 80), rx=_u(rng, 19, 25), ry=_u(rng, 14, 18),
                  tilt=_u(rng, -0.08, 0.08), period=_u(rng, 30, 36), phase=_u(rng, 0, 36),
                  disc_frac=_u(rng, 0.2, 0.28), canal_r=_u(rng, 7, 10), process_len=_u(rng, 18, 28),
                  transverse_x=_u(rng, 38, 50))
    xl, yl = _u(rng, -75, -60), _u(rng, -10, 10)
    kz = -_u(rng, 95, 115)
    ribs = Ribs(z_lowest=kz + _u(rng, 40, 60), period=_u(rng, 24, 30), n=8, drop=_u(rng, 90, 140),
                ends=(0.35 * np.pi, 0.5 * np.pi) + tuple(_u(rng, 0.8, 0.92) * np.pi for _ in range(6)),
                half_radial=min(5.0, 0.45 * body.muscle), half_height=_u(rng, 4, 6),
                posterior_depth=_u(rng, 25, 40), posterior_theta=_u(rng, 0.3, 0.4) * np.pi)
    lobes = [
        Ellipsoid((xl, yl, 0.0), (_u(rng, 60, 75), _u(rng, 72, 88), _u(rng, 72, 92)), random_rotation(rng, 10)),
        Ellipsoid((xl + _u(rng, 45, 60), yl - _u(rng, 20, 30), _u(rng, 5, 15)),
                  (_u(rng, 40, 50), _u(rng, 45, 55), _u(rng, 40, 50)), random_rotation(rng, 10)),
        Ellipsoid((xl + _u(rng, 100, 120), yl - _u(rng, 35, 50), _u(rng, 20, 30)),
                  (_u(rng, 35, 60), _u(rng, 20, 30), _u(rng, 18, 26)),
                  _rot_z(_u(rng, -20, 0)) @ random_rotation(rng, 8)),
    ]
    impression = Ellipsoid((xl + _u(rng, 0, 20), yl + _u(rng, 45, 60), -_u(rng, 85, 100)), (70, 55, 55))
    kidneys = []
    for side, dz in ((-1.0, 0.0), (1.0, _u(rng, 10, 25))):
        rot = rotation_matrix((0, 1, 0), np.radians(side * _u(rng, 5, 15))) @ _rot_z(side * _u(rng, 20, 40))
        shape = Ellipsoid((side * _u(rng, 62, 75), spine.y_body + _u(rng, 8, 20), kz + dz),
                          (_u(rng, 24, 30), _u(rng, 20, 26), _u(rng, 48, 60)), rot)
        sinus = Ellipsoid(tuple(np.asarray(shape.centre) + rot @ np.array([-side * 0.6 * shape.radii[0], 0, 0])),
                          tuple(0.5 * np.asarray(shape.radii)), rot)
        kidneys.append((Organ(shape, draw_waves(rng, 2, (60, 120), 1.5)), sinus))
    spleen = Organ(Ellipsoid((_u(rng, 85, 100), _u(rng, 35, 55), zl - _u(rng, 55, 75)),
                             (_u(rng, 22, 30), _u(rng, 45, 60), _u(rng, 40, 55)), _rot_z(_u(rng, 20, 45))),
                   draw_waves(rng, 3, (50, 120), 3.0))
    stomach = Organ(Ellipsoid((_u(rng, 50, 70), -_u(rng, 0, 20), zl - _u(rng, 50, 70)),
                              (_u(rng, 35, 55), _u(rng, 30, 42), _u(rng, 45, 65)),
                              _rot_z(_u(rng, -20, 20)) @ random_rotation(rng, 15)),
                    draw_waves(rng, 3, (40, 100), 3.0))
    s_c, s_r = stomach.shape.centre, stomach.shape.radii
    gas_y = None if rng.random() < 0.2 else s_c[1] - s_r[1] * _u(rng, 0.2, 0.8)
    heart = Ellipsoid((_u(rng, 10, 30), -_u(rng, 30, 50), zl + _u(rng, 25, 40)),
                      (_u(rng, 55, 70), _u(rng, 45, 55), _u(rng, 45, 60)), _rot_z(_u(rng, 20, 40)))
    front = spine.y_body - spine.ry
    aorta = (_u(rng, 8, 18), front - _u(rng, 12, 16), _u(rng, 9, 13))
    ivc = (-_u(rng, 20, 28), front - _u(rng, 14, 20), _u(rng, 11, 15), _u(rng, 8, 11))
    gallbladder = None
    if rng.random() < 0.7:
        gallbladder = Ellipsoid((xl + _u(rng, 35, 50), yl - _u(rng, 40, 55), -_u(rng, 50, 65)),
                                (_u(rng, 13, 19), _u(rng, 13, 19), _u(rng, 28, 42)),
                                rotation_matrix((1, 0, 0), np.radians(_u(rng, 20, 45))))
    hu, phase = _draw_hu(rng)
    back = (_u(rng, 70, 90), body.y_flat - spine.y_body - 0.3 * spine.ry)
    liver_waves = draw_waves(rng, 4, (60, 140), _u(rng, 4, 7))
    return Anatomy(centre_lps=centre, body=body, diaphragm=diaphragm, spine=spine, ribs=ribs, back_muscle=back,
                   liver_lobes=lobes, liver_impression=impression, liver_waves=liver_waves, spleen=spleen,
                   stomach=stomach, gas_y=gas_y, kidneys=kidneys, heart=heart, aorta=aorta, ivc=ivc,
                   gallbladder=gallbladder, hu=hu, phase=phase)


def liver_lattice(an: Anatomy) -> tuple:
    """Points (n, 3) of a ``LATTICE_MM`` lattice inside the liver and their liver distances (mm)."""
    lo = np.min([lobe.bounds()[0] for lobe in an.liver_lobes], axis=0) - an.liver_waves.max_abs
    hi = np.max([lobe.bounds()[1] for lobe in an.liver_lobes], axis=0) + an.liver_waves.max_abs
    axes = [np.arange(lo[i], hi[i] + LATTICE_MM, LATTICE_MM, dtype=F32) for i in range(3)]
    x, y, z = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
    d = an.liver_sdf(x, y, z)
    inside = d < 0
    return np.stack([x[inside], y[inside], z[inside]], axis=1).astype(np.float64), d[inside].astype(np.float64)


def finish_anatomy(an: Anatomy, rng_vessels: np.random.Generator, rng_tumours: np.random.Generator,
                   n_tumors: int | None, diameters_mm: tuple | None) -> None:
    """Set the liver bounds (mm), hepatic vessels and tumours of ``an``, each from its own generator."""
    pts, dist = liver_lattice(an)
    an.liver_lo = pts.min(axis=0) - LATTICE_MM
    an.liver_hi = pts.max(axis=0) + LATTICE_MM
    an.vessels = _draw_vessels(an, rng_vessels, pts, dist)
    an.tumours = _draw_tumours(an, rng_tumours, pts, dist, n_tumors, diameters_mm)


def _pick(rng: np.random.Generator, pts: np.ndarray, ok: np.ndarray) -> np.ndarray | None:
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    return pts[idx[rng.integers(idx.size)]] + rng.uniform(-LATTICE_MM / 2, LATTICE_MM / 2, 3)


def _draw_vessels(an: Anatomy, rng: np.random.Generator, pts: np.ndarray, dist: np.ndarray) -> list:
    """Portal branches from the hilum and hepatic veins towards the IVC: (p0, p1, radius mm)."""
    vessels = []
    deep = dist < -12.0
    xl = an.liver_lobes[0].centre[0]
    hilum = np.array([xl + _u(rng, 40, 55), _u(rng, 5, 20), -_u(rng, 15, 30)])
    for side in (pts[:, 0] < xl, pts[:, 0] > xl + 60, np.abs(pts[:, 0] - xl - 30) < 20):
        p1 = _pick(rng, pts, deep & side)
        if p1 is None:
            continue
        vessels.append((hilum, p1, _u(rng, 4.5, 6.5)))
        for _ in range(2):
            p2 = _pick(rng, pts, deep & (np.linalg.norm(pts - p1, axis=1) < 45))
            if p2 is not None:
                vessels.append((p1, p2, _u(rng, 2.5, 3.5)))
    top = np.array([an.ivc[0], an.ivc[1], an.diaphragm.right[2] - _u(rng, 15, 25)])
    for side in (pts[:, 0] < xl - 20, np.abs(pts[:, 0] - xl - 40) < 20, pts[:, 0] > xl + 70):
        p1 = _pick(rng, pts, deep & side & (pts[:, 2] > top[2] - 90))
        if p1 is not None:
            vessels.append((top, p1, _u(rng, 3.5, 5.5)))
    return vessels


def _tumour_diameters(rng: np.random.Generator, n_tumors: int | None, diameters_mm: tuple | None) -> list:
    if diameters_mm is not None:
        d = [float(v) for v in diameters_mm]
        if n_tumors is None or n_tumors == len(d):
            return d
        if len(d) != 2:
            raise PhantomError("tumor_diameters_mm must give one diameter per tumour, or a (min, max) range in mm")
        return [float(np.exp(rng.uniform(np.log(d[0]), np.log(d[1])))) for _ in range(n_tumors)]
    if n_tumors is None:
        n_tumors = 0 if rng.random() < 0.25 else int(min(rng.geometric(0.45), 8))
    return [float(np.exp(rng.uniform(np.log(3.0), np.log(60.0)))) for _ in range(n_tumors)]


def _draw_tumours(an: Anatomy, rng: np.random.Generator, pts: np.ndarray, dist: np.ndarray,
                  n_tumors: int | None, diameters_mm: tuple | None) -> list:
    """Tumours placed inside the liver, largest first, not overlapping each other much."""
    tumours = []
    liver = an.hu["liver"]
    diameters = sorted(_tumour_diameters(rng, n_tumors, diameters_mm), reverse=True)
    p_hypo = 0.9 if rng.random() < 0.7 else 0.15
    for diameter in diameters:
        diameter = max(3.0, diameter)
        centre = None
        while centre is None and diameter >= 3.0:
            r = diameter / 2.0
            ok = dist < -min(0.6 * r, 12.0)
            for t in tumours:
                c = np.asarray(t.organ.shape.centre)
                ok &= np.linalg.norm(pts - c, axis=1) > 0.7 * (r + t.diameter_mm / 2.0) + 2.0
            centre = _pick(rng, pts, ok)
            if centre is None:
                diameter *= 0.8
        if centre is None:
            continue
        r = diameter / 2.0
        radii = r * np.exp(rng.normal(0.0, 0.12, 3))
        radii *= r / np.prod(radii) ** (1.0 / 3.0)
        shape = Ellipsoid(tuple(centre), tuple(radii), random_rotation(rng))
        waves = draw_waves(rng, 3, (max(6.0, 1.2 * r), max(8.0, 3.0 * r)), 0.08 * r)
        if rng.random() < p_hypo:
            kind, hu = "hypo", min(_u(rng, 0, 35), liver - 15.0)
            core = max(-5.0, hu - _u(rng, 5, 15)) if diameter > 30 else None
        else:
            kind, hu = "hyper", _u(rng, 80, 150)
            core = hu - _u(rng, 20, 40) if diameter > 25 else None
        tumours.append(Tumour(Organ(shape, waves), float(diameter), kind, float(hu), core))
    return tumours
