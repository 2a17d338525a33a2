"""Shape primitives of the synthetic CT phantom, in physical millimetres.

Every shape is evaluated on coordinate arrays ``x, y, z`` given in the *patient frame*:
LPS axes (x towards the patient's left, y towards posterior, z towards superior), in
mm, with the origin at the centre of the body cross-section at the level of the liver.
The arrays may have any (broadcastable) shape, so the same code evaluates a voxel grid
of any orientation and spacing, or a flat list of points.

Shapes return a signed distance-like field in mm: negative inside, zero on the surface,
close to the true Euclidean distance near the surface (first-order approximation), which
is what partial-volume painting and layer thicknesses need. Arrays are float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

F32 = np.float32


def rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """3x3 rotation by ``angle_rad`` radians about ``axis`` (right-hand rule)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1.0 - np.cos(angle_rad)) * (k @ k)


def random_rotation(rng: np.random.Generator, max_deg: float | None = None) -> np.ndarray:
    """A random rotation; uniform over SO(3) when ``max_deg`` is None, else at most ``max_deg`` degrees."""
    if max_deg is None:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q
    return rotation_matrix(rng.normal(size=3), np.radians(rng.uniform(-max_deg, max_deg)))


def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum (union) of two distance fields, blending over ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + h * (a - b) - k * h * (1.0 - h)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (intersection) of two distance fields, blending over ``k`` mm."""
    return -smin(-a, -b, k)


def ellipse_sdf(u: np.ndarray, v: np.ndarray, ru: float, rv: float) -> np.ndarray:
    """Approximate distance in mm to the ellipse (u/ru)^2 + (v/rv)^2 = 1 (u, v in mm)."""
    su = u * F32(1.0 / ru)
    sv = v * F32(1.0 / rv)
    q2 = su * su + sv * sv
    su *= F32(1.0 / ru)
    sv *= F32(1.0 / rv)
    g = np.sqrt(su * su + sv * sv)
    np.maximum(g, F32(0.5 / max(ru, rv)), out=g)
    q2 -= F32(1.0)
    q2 /= g
    q2 *= F32(0.5)
    return q2


@dataclass
class Ellipsoid:
    """An ellipsoid: ``centre`` (mm), ``radii`` (mm) along the columns of ``rot``."""

    centre: tuple
    radii: tuple
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate signed distance in mm (negative inside)."""
        d = (x - F32(self.centre[0]), y - F32(self.centre[1]), z - F32(self.centre[2]))
        q2 = None
        g2 = None
        for a in range(3):
            r = float(self.radii[a])
            u = None
            for b in range(3):
                c = float(self.rot[b, a]) / r
                if abs(c) < 1e-9:
                    continue
                u = d[b] * F32(c) if u is None else u + d[b] * F32(c)
            if u is None:
                continue
            uu = u * u
            q2 = uu if q2 is None else q2 + uu
            uu = uu * F32(1.0 / (r * r))
            g2 = uu if g2 is None else g2 + uu
        np.maximum(g2, F32((0.5 / max(self.radii)) ** 2), out=g2)
        np.sqrt(g2, out=g2)
        q2 -= F32(1.0)
        q2 /= g2
        q2 *= F32(0.5)
        return q2

    def bounds(self, margin: float = 0.0) -> tuple:
        """Axis-aligned bounding box (lo, hi) in mm, grown by ``margin`` mm."""
        half = np.sqrt(((self.rot * np.asarray(self.radii)[None, :]) ** 2).sum(axis=1)) + margin
        c = np.asarray(self.centre, dtype=np.float64)
        return c - half, c + half


@dataclass
class Waves:
    """A smooth random scalar field in mm: a sum of plane sine waves (wave vectors in rad/mm)."""

    k: np.ndarray
    phase: np.ndarray
    amp: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Field value in mm at the given points."""
        out = None
        for (kx, ky, kz), ph, am in zip(self.k, self.phase, self.amp):
            t = x * F32(kx) + y * F32(ky)
            t += z * F32(kz) + F32(ph)
            np.sin(t, out=t)
            t *= F32(am)
            if out is None:
                out = t
            else:
                out += t
        return out

    @property
    def max_abs(self) -> float:
        """Upper bound of the field's magnitude in mm."""
        return float(np.abs(self.amp).sum())


def draw_waves(rng: np.random.Generator, n: int, wavelength_mm: tuple, rms_mm: float) -> Waves:
    """``n`` random plane waves with wavelengths in ``wavelength_mm`` and total RMS ``rms_mm``."""
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    wl = rng.uniform(wavelength_mm[0], wavelength_mm[1], n)
    amp = rng.uniform(0.5, 1.0, n)
    amp *= rms_mm / np.sqrt((amp**2 / 2.0).sum())
    return Waves(k=dirs * (2.0 * np.pi / wl)[:, None], phase=rng.uniform(0.0, 2.0 * np.pi, n), amp=amp)


def capsule_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray, p0: tuple, p1: tuple, r: float) -> np.ndarray:
    """Signed distance in mm to a tube of radius ``r`` mm around the segment p0-p1 (mm)."""
    p0 = np.asarray(p0, dtype=np.float64)
    e = np.asarray(p1, dtype=np.float64) - p0
    ee = float(e @ e)
    dx, dy, dz = x - F32(p0[0]), y - F32(p0[1]), z - F32(p0[2])
    t = (dx * F32(e[0]) + dy * F32(e[1]) + dz * F32(e[2])) * F32(1.0 / ee)
    np.clip(t, F32(0.0), F32(1.0), out=t)
    dx -= t * F32(e[0])
    dy -= t * F32(e[1])
    dz -= t * F32(e[2])
    d = np.sqrt(dx * dx + dy * dy + dz * dz)
    d -= F32(r)
    return d


@dataclass
class Body:
    """Body outline: an ellipse-like cross-section (flat back) with fat and muscle layers, mm."""

    a: float
    b_ant: float
    b_post: float
    y_flat: float
    swell: float
    swell_wavelength: float
    swell_phase: float
    waves: Waves
    fat: float
    fat_waves: Waves
    muscle: float

    def depth(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Depth below the skin in mm (positive inside the body, negative in the air)."""
        s = F32(1.0) + F32(self.swell) * np.sin(z * F32(2 * np.pi / self.swell_wavelength) + F32(self.swell_phase))
        b = np.where(y < 0, F32(self.b_ant), F32(self.b_post))
        u = x / (F32(self.a) * s)
        v = y / (b * s)
        q2 = u * u + v * v
        u /= F32(self.a) * s
        v /= b * s
        g = np.sqrt(u * u + v * v)
        np.maximum(g, F32(0.5 / self.a), out=g)
        d = (q2 - F32(1.0)) / (F32(2.0) * g)
        np.maximum(d, y - F32(self.y_flat), out=d)
        d += self.waves(x, y, z)
        np.negative(d, out=d)
        return d

    def fat_thickness(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Local subcutaneous fat thickness in mm."""
        t = self.fat_waves(x, y, z)
        t += F32(1.0)
        t *= F32(self.fat)
        np.maximum(t, F32(2.0), out=t)
        return t


@dataclass
class Diaphragm:
    """Two paraboloid domes (right and left); apexes (x, y, z) in mm, curvature radii in mm."""

    right: tuple
    left: tuple
    curv_right: float
    curv_left: float

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """z in mm of the diaphragm surface above (x, y)."""
        out = None
        for (x0, y0, z0), c in ((self.right, self.curv_right), (self.left, self.curv_left)):
            dx = x - F32(x0)
            dy = y - F32(y0)
            dy *= np.where(dy > 0, F32(1.3), F32(0.7))
            h = F32(z0) - (dx * dx + dy * dy) * F32(0.5 / c)
            out = h if out is None else smax(out, h, 25.0)
        return out


@dataclass
class Spine:
    """Vertebral column along z: bodies, discs, canal and posterior elements (all mm)."""

    y_body: float
    rx: float
    ry: float
    tilt: float
    period: float
    phase: float
    disc_frac: float
    canal_r: float
    process_len: float
    transverse_x: float

    def y_centre(self, z: np.ndarray) -> np.ndarray:
        """y in mm of the vertebral body axis at height z."""
        return F32(self.y_body) + F32(self.tilt) * z

    def parts(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict:
        """Distance fields (mm) of the parts: body, disc, cortex depth, arch, canal."""
        yc = self.y_centre(z)
        t = (z - F32(self.phase)) * F32(1.0 / self.period)
        f = (t - np.floor(t)) * F32(self.period)
        lo = self.disc_frac * self.period
        body = ellipse_sdf(x, y - yc, self.rx, self.ry)
        in_level = np.maximum(F32(lo) - f, f - F32(self.period))
        to_disc = np.minimum(f - F32(lo), F32(self.period) - f)
        yk = yc + F32(self.ry + self.canal_r + 1.5)
        dyk = y - yk
        rho = np.sqrt(x * x + dyk * dyk)
        gate = np.maximum(F32(lo + 2.0) - f, f - F32(self.period - 3.0))
        ring = np.maximum(F32(self.canal_r) - rho, rho - F32(self.canal_r + 6.0))
        back = F32(self.canal_r + 3.0)
        spinous = np.maximum(np.abs(x) - F32(4.0), np.maximum(back - dyk, dyk - back - F32(self.process_len)))
        mid = F32(lo + 0.45 * (self.period - lo))
        tgate = np.abs(f - mid) - F32(5.0)
        transverse = np.maximum(np.abs(x) - F32(self.transverse_x), np.abs(dyk + F32(2.0)) - F32(5.0))
        arch = np.maximum(np.minimum(np.minimum(ring, spinous), np.maximum(transverse, tgate)), gate)
        return {
            "body": np.maximum(body, in_level),
            "disc": np.maximum(body, f - F32(lo)),
            "cortex": np.minimum(-body, to_disc),
            "arch": arch,
            "canal": rho - F32(self.canal_r),
        }


@dataclass
class Ribs:
    """Lower ribs as tubes in the chest wall, descending from posterior to anterior (mm)."""

    z_lowest: float
    period: float
    n: int
    drop: float
    ends: tuple
    half_radial: float
    half_height: float
    posterior_depth: float
    posterior_theta: float

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, depth: np.ndarray, centre_depth: np.ndarray,
            a: float, b: float) -> np.ndarray:
        """Distance in mm to the nearest rib; ``depth``/``centre_depth`` are depths below the skin (mm)."""
        theta = np.arctan2(np.abs(x) * F32(1.0 / a), y * F32(1.0 / b))
        zt = z - F32(self.z_lowest) + theta * F32(self.drop / np.pi)
        idx = np.clip(np.rint(zt * F32(1.0 / self.period)), 0, self.n - 1)
        dz = zt - idx * F32(self.period)
        dr = depth - centre_depth
        deeper = np.clip(F32(1.0) - theta * F32(1.0 / self.posterior_theta), F32(0.0), F32(1.0))
        dr -= deeper * F32(self.posterior_depth)
        dz *= F32(1.0 / self.half_height)
        dr *= F32(1.0 / self.half_radial)
        d = np.sqrt(dz * dz + dr * dr)
        d -= F32(1.0)
        d *= F32(self.half_radial)
        ends = np.asarray(self.ends, dtype=F32)[idx.astype(np.int64)]
        np.maximum(d, (theta - ends) * F32(0.5 * (a + b)), out=d)
        np.maximum(d, (F32(0.1 * np.pi) - theta) * F32(0.5 * (a + b)), out=d)
        return d
