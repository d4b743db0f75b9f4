"""Synthetic anatomy for the data generator: brain-like and knee-like volumes, coil maps, smooth phase.

Everything is an analytic function of continuous coordinates ``(u, v, z)`` in *object units*:
``u`` runs across the image width (phase encoding, W), ``v`` down the height (read-out, H), and one
unit is ``crop / 2`` pixels, so the same volume looks the same at every preset size. A slice is
the model evaluated at one ``z``; adjacent slices are close in ``z`` and therefore change smoothly.
With the real read-out oversampling (H = 2 x crop) the object fills the central half of H.

Textures and folding patterns are smooth Gaussian-like random fields built from random Fourier
features; because every feature is separable in ``(u, v)`` a slice costs two small matrix products.
All randomness comes from the caller's :class:`numpy.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ANATOMY_KINDS = ("brain", "knee")


@dataclass(frozen=True)
class Grid:
    """Pixel grid of one slice in object units.

    Attributes:
        height: H, rows (read-out).
        width: W, columns (phase encoding).
        scale: pixels per object unit (``crop / 2``).
    """

    height: int
    width: int
    scale: float

    @property
    def u(self) -> np.ndarray:
        """Column coordinates ``(W,)``; the centre column ``W // 2`` is 0."""
        return (np.arange(self.width) - self.width // 2) / self.scale

    @property
    def v(self) -> np.ndarray:
        """Row coordinates ``(H,)``; the centre row ``H // 2`` is 0."""
        return (np.arange(self.height) - self.height // 2) / self.scale

    @property
    def pixel(self) -> float:
        """The size of one pixel in object units."""
        return 1.0 / self.scale


class SmoothField:
    """A smooth random scalar field of ``(u, v, z)`` with zero mean and unit variance.

    It is a sum of ``n`` random Fourier features ``sqrt(2/n) cos(w . x + phi)`` whose frequencies
    are Gaussian with standard deviation ``1 / length`` per axis (a squared-exponential
    covariance). Anisotropic lengths give striated textures (muscle fibres).

    Args:
        rng: the caller's generator.
        length: correlation length in object units, one value or ``(lu, lv, lz)``.
        n_features: number of Fourier features (more gives a more Gaussian field).
    """

    def __init__(self, rng: np.random.Generator, length: float | tuple[float, float, float], n_features: int = 48):
        lengths = np.broadcast_to(np.asarray(length, dtype=np.float64), (3,))
        self.omega = rng.normal(size=(n_features, 3)) / lengths
        self.phi = rng.uniform(0.0, 2.0 * np.pi, size=n_features)
        self.gain = np.sqrt(2.0 / n_features)

    def slice(self, u: np.ndarray, v: np.ndarray, z: float, blur: float = 0.0) -> np.ndarray:
        """Evaluate on the grid ``v x u`` at depth ``z``.

        Args:
            u: column coordinates ``(W,)``.
            v: row coordinates ``(H,)``.
            z: slice position.
            blur: Gaussian blur (standard deviation, object units) applied in-plane; pass the pixel
                size so that detail finer than a pixel fades instead of aliasing into speckle.

        Returns:
            ``float32`` array ``(H, W)``.
        """
        weight = self.gain * np.exp(-0.5 * blur**2 * (self.omega[:, 0] ** 2 + self.omega[:, 1] ** 2))
        a = np.outer(self.omega[:, 0], u)  # (n, W)
        b = np.outer(v, self.omega[:, 1]) + self.omega[:, 2] * z + self.phi  # (H, n)
        out = (np.cos(b) * weight) @ np.cos(a) - (np.sin(b) * weight) @ np.sin(a)
        return out.astype(np.float32)

    def distance(self, u: np.ndarray, v: np.ndarray, z: float, length: float) -> np.ndarray:
        """Approximate distance ``|f| * length / sqrt(2)`` to the field's zero set (thin curves)."""
        return np.abs(self.slice(u, v, z)) * (length / np.sqrt(2.0))


def step(x: np.ndarray, width: float) -> np.ndarray:
    """Soft Heaviside ``0.5 (1 + tanh(x / width))``: 1 inside (x > 0), 0 outside."""
    return 0.5 * (1.0 + np.tanh(x / width))


def ellipse_sdf(u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (negative inside), in object units."""
    return (np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2) - 1.0) * min(a, b)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _jitter(rng: np.random.Generator, value: float, rel: float) -> float:
    return float(value * (1.0 + rng.uniform(-rel, rel)))


class BrainPhantom:
    """An axial head: scalp fat, skull, CSF rim, folded grey/white matter, sulci, ventricles, falx.

    The head is an ellipsoid whose cross-section shrinks with ``|z|``; the lateral ventricles
    grow and shrink through the slab. Contrast is T1, T2 or FLAIR at random.

    Args:
        rng: the caller's generator (all shape and contrast parameters are drawn here).
        grid: the slice grid.
    """

    # tissue: fat, skull, csf, gm, wm (relative intensities before the per-volume scale)
    CONTRASTS = {
        "T1": (1.0, 0.06, 0.12, 0.55, 0.80),
        "T2": (0.70, 0.05, 1.0, 0.62, 0.42),
        "FLAIR": (0.75, 0.05, 0.08, 0.78, 0.52),
    }

    def __init__(self, rng: np.random.Generator, grid: Grid):
        self.grid = grid
        self.centre = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
        self.angle = rng.uniform(-0.12, 0.12)
        self.axes = (rng.uniform(0.66, 0.76), rng.uniform(0.82, 0.92))
        self.depth = rng.uniform(0.95, 1.1)  # head semi-axis along z
        self.harmonics = rng.normal(scale=0.015, size=(3, 2))
        self.layers = (rng.uniform(0.91, 0.94), rng.uniform(0.85, 0.88), rng.uniform(0.81, 0.84))
        self.contrast = str(rng.choice(list(self.CONTRASTS)))
        self.values = [_jitter(rng, x, 0.08) for x in self.CONTRASTS[self.contrast]]
        self.ventricle_z = rng.uniform(-0.1, 0.15)
        self.fold = SmoothField(rng, 0.12)
        self.sulci = SmoothField(rng, 0.07)
        self.texture = SmoothField(rng, 0.03)

    def coil_centres(self, rng: np.random.Generator, n_coils: int, z_mid: float) -> np.ndarray:
        """Loop-coil centres ``(C, 3)`` on an ellipse around the head; two rings at +-z when C > 8."""
        phase0 = rng.uniform(0, 2 * np.pi)
        ang = phase0 + 2 * np.pi * np.arange(n_coils) / n_coils + rng.normal(scale=0.05, size=n_coils)
        ru, rv = 1.2 * self.axes[0], 1.15 * self.axes[1]
        zc = np.full(n_coils, z_mid)
        if n_coils > 8:
            zc = z_mid + np.where(np.arange(n_coils) % 2 == 0, 0.3, -0.3)
        return np.stack([self.centre[0] + ru * np.cos(ang), self.centre[1] + rv * np.sin(ang), zc], axis=1)

    def slice(self, z: float) -> np.ndarray:
        """Magnitude image ``(H, W)`` float32 at depth ``z`` (values about 0..1)."""
        g = self.grid
        x = g.u[None, :] - self.centre[0]
        y = g.v[:, None] - self.centre[1]
        c, s = np.cos(self.angle), np.sin(self.angle)
        uu, vv = c * x + s * y, -s * x + c * y
        shrink = np.sqrt(np.clip(1.0 - (z / self.depth) ** 2, 0.05, 1.0))
        a, b = self.axes[0] * shrink, self.axes[1] * shrink
        theta = np.arctan2(vv / b, uu / a)
        bump = 1.0 + sum(h[0] * np.cos((k + 2) * theta) + h[1] * np.sin((k + 2) * theta)
                         for k, h in enumerate(self.harmonics))
        rho = np.sqrt((uu / a) ** 2 + (vv / b) ** 2) / bump
        ew = 0.6 * g.pixel / min(a, b)  # one edge, in rho units
        fat, skull, csf, gm, wm = self.values
        scalp_in, skull_in, brain_out = self.layers
        m_head = step(1.0 - rho, ew)
        m_bone = step(scalp_in - rho, ew)
        m_csf = step(skull_in - rho, ew)
        m_brain = step(brain_out - rho, ew)
        rb = rho / brain_out

        fold = self.fold.slice(g.u, g.v, z)
        tissue = gm + (wm - gm) * step(0.70 + 0.10 * fold - rb, 1.5 * ew)
        half_width = max(0.006, 0.6 * g.pixel)
        sulcus = step(half_width - self.sulci.distance(g.u, g.v, z, 0.07), 0.5 * g.pixel) * step(rb - 0.55, 0.05)
        tissue = tissue + (csf - tissue) * sulcus
        env = float(np.exp(-(((z - self.ventricle_z) / 0.35) ** 2)))
        if env > 0.15:
            for side in (-1.0, 1.0):
                cu, cv, rot = side * 0.10 * a, -0.03 * b, side * 0.3
                cr, sr = np.cos(rot), np.sin(rot)
                pu, pv = cr * (uu - cu) + sr * (vv - cv), -sr * (uu - cu) + cr * (vv - cv)
                half_w, half_h = (0.04 + 0.03 * env) * a, 0.30 * b * env
                vent = step(-ellipse_sdf(pu, pv, 0.0, 0.0, half_w, half_h), 0.6 * g.pixel)
                tissue = tissue + (csf - tissue) * vent
        falx = step(0.012 - np.abs(uu), 0.6 * g.pixel) * (step(-0.3 * b - vv, 0.02) + step(vv - 0.42 * b, 0.02))
        tissue = tissue + (csf - tissue) * falx * step(0.97 - rb, ew)

        img = fat * (m_head - m_bone) + skull * (m_bone - m_csf) + csf * (m_csf - m_brain) + tissue * m_brain
        img = img * (1.0 + 0.05 * self.texture.slice(g.u, g.v, z, blur=g.pixel))
        return np.clip(img, 0.0, None).astype(np.float32)


class KneePhantom:
    """A coronal knee: leg with subcutaneous fat, striated muscle, femur with condyles and notch,
    tibial plateau, fibular head, cortical rim, trabecular marrow, cartilage, menisci, joint fluid.

    The leg runs along ``v`` and fills the field of view from top to bottom. Contrast is proton
    density (PD) or fat-suppressed PD (PD-FS) at random.

    Args:
        rng: the caller's generator.
        grid: the slice grid.
    """

    # tissue: fat, muscle, marrow, cortex, cartilage, fluid, meniscus
    CONTRASTS = {
        "PD": (1.0, 0.36, 0.85, 0.03, 0.55, 0.62, 0.05),
        "PD-FS": (0.16, 0.32, 0.14, 0.03, 0.52, 1.0, 0.05),
    }

    def __init__(self, rng: np.random.Generator, grid: Grid):
        self.grid = grid
        self.leg_u = rng.uniform(-0.06, 0.06)
        self.leg_w = rng.uniform(0.52, 0.62)
        self.joint_v = rng.uniform(-0.08, 0.10)
        self.angle = rng.uniform(-0.06, 0.06)
        self.bone_scale = rng.uniform(0.9, 1.1)
        self.notch_z = rng.uniform(-0.15, 0.15)
        self.fibula_side = float(rng.choice([-1.0, 1.0]))
        self.fat_thick = rng.uniform(0.04, 0.08)
        self.contrast = str(rng.choice(list(self.CONTRASTS)))
        self.values = [_jitter(rng, x, 0.08) for x in self.CONTRASTS[self.contrast]]
        self.striation = SmoothField(rng, (0.015, 0.25, 0.05))
        self.trabecular = SmoothField(rng, 0.02)
        self.outline = SmoothField(rng, 0.3)

    def coil_centres(self, rng: np.random.Generator, n_coils: int, z_mid: float) -> np.ndarray:
        """Loop-coil centres ``(C, 3)`` on a cylinder around the leg axis (two rings when C > 8)."""
        ang = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n_coils) / n_coils
        radius = 1.25 * self.leg_w
        vc = np.full(n_coils, self.joint_v)
        if n_coils > 8:
            vc = self.joint_v + np.where(np.arange(n_coils) % 2 == 0, 0.3, -0.3)
        return np.stack([self.leg_u + radius * np.cos(ang), vc, z_mid + radius * np.sin(ang)], axis=1)

    def slice(self, z: float) -> np.ndarray:
        """Magnitude image ``(H, W)`` float32 at depth ``z`` (values about 0..1)."""
        g = self.grid
        x = g.u[None, :] - self.leg_u
        y = g.v[:, None] - self.joint_v
        c, s = np.cos(self.angle), np.sin(self.angle)
        uu, vv = c * x + s * y, -s * x + c * y  # joint centre at the origin, v down the leg
        ew = 0.6 * g.pixel
        fat, muscle, marrow, cortex, cartilage, fluid, meniscus = self.values
        k = self.bone_scale * np.sqrt(np.clip(1.0 - (z / 0.9) ** 2, 0.2, 1.0))

        # leg outline: wider at the joint, narrower away from the slab centre
        leg_half = self.leg_w * np.sqrt(np.clip(1.0 - (z / 1.2) ** 2, 0.3, 1.0))
        leg_half = leg_half * (1.0 + 0.08 * np.exp(-(vv / 0.35) ** 2)) + 0.02 * self.outline.slice(g.u, g.v, z)
        leg_sdf = np.abs(uu) - leg_half
        m_leg = step(-leg_sdf, ew)
        m_fat = m_leg * step(leg_sdf + self.fat_thick, ew)

        # femur: shaft flaring into two condyles, minus the intercondylar notch
        femur_half = k * (0.17 + 0.19 * _smoothstep((vv + 0.55) / 0.4))
        femur = np.maximum(np.abs(uu) - femur_half, vv + 0.12 * k)
        for side in (-1.0, 1.0):
            femur = np.minimum(femur, ellipse_sdf(uu, vv, side * 0.19 * k, -0.14 * k, 0.17 * k, 0.13 * k))
        notch_w = 0.03 + 0.06 * float(step(np.asarray(z - self.notch_z), 0.1))
        femur = np.maximum(femur, -ellipse_sdf(uu, vv, 0.0, -0.03 * k, notch_w * k, 0.16 * k))
        # tibia: plateau tapering to the shaft; fibular head on one side
        tibia_half = k * (0.38 - 0.21 * _smoothstep((vv - 0.12) / 0.38))
        tibia = np.maximum(np.abs(uu) - tibia_half, 0.03 * k - vv)
        fib_env = float(np.exp(-(((z - 0.3) / 0.4) ** 2)))
        if fib_env > 0.2:
            fib = ellipse_sdf(uu, vv, self.fibula_side * 0.36 * k, 0.32 * k, 0.06 * k * fib_env, 0.08 * k)
            tibia = np.minimum(tibia, fib)
        bone = np.minimum(femur, tibia)

        m_bone = step(-bone, ew)
        m_cortex = m_bone * step(bone + 0.018, ew)
        joint_env = np.exp(-((vv / (0.12 * k)) ** 2))
        m_cart = (step(-(bone - 0.025 * k), ew) - m_bone) * joint_env * step(0.45 * k - np.abs(uu), 0.02)
        gap = np.exp(-((vv - 0.0 * k) / (0.03 * k)) ** 2) * step(0.28 * k - np.abs(uu), 0.02)
        m_fluid = np.clip(gap * (1.0 - m_bone) - m_cart, 0.0, 1.0) * 0.8
        m_menisc = np.zeros_like(m_bone)
        for side in (-1.0, 1.0):
            m_menisc = np.maximum(m_menisc, step(-ellipse_sdf(uu, vv, side * 0.34 * k, 0.0, 0.08 * k, 0.03 * k), ew))

        striation = 1.0 + 0.12 * self.striation.slice(g.u, g.v, z, blur=g.pixel)
        img = muscle * striation * (m_leg - m_fat) + fat * m_fat
        trabecular = 1.0 + 0.15 * self.trabecular.slice(g.u, g.v, z, blur=g.pixel)
        bone_val = marrow * trabecular * (m_bone - m_cortex) + cortex * m_cortex
        img = img * (1.0 - m_bone) + bone_val
        img = img + (cartilage - img) * m_cart
        img = img + (fluid - img) * m_fluid
        img = img + (meniscus - img) * m_menisc * m_leg
        return np.clip(img, 0.0, None).astype(np.float32)


def make_phantom(anatomy: str, rng: np.random.Generator, grid: Grid) -> BrainPhantom | KneePhantom:
    """Draw a brain or knee phantom.

    Args:
        anatomy: ``"brain"`` or ``"knee"``.
        rng: the caller's generator.
        grid: the slice grid.

    Returns:
        A phantom with ``slice(z)`` and ``coil_centres(rng, n_coils, z_mid)``.
    """
    if anatomy == "brain":
        return BrainPhantom(rng, grid)
    if anatomy == "knee":
        return KneePhantom(rng, grid)
    raise ValueError(f"anatomy must be one of {ANATOMY_KINDS}, got {anatomy!r}")


class CoilModel:
    """Loop-coil sensitivities: magnitude ``(1 + d^2 / r^2)^-1.5``, phase = azimuth + linear term.

    ``d`` is the 3-D distance from the coil centre, so the maps change smoothly with ``z`` too.
    The maps are not normalised (the per-volume intensity scale absorbs it).

    Args:
        rng: the caller's generator (draws the per-coil phase terms).
        centres: coil centres ``(C, 3)`` in object units ``(u, v, z)``.
        radius: coil radius ``r`` in object units.
    """

    def __init__(self, rng: np.random.Generator, centres: np.ndarray, radius: float):
        if centres.ndim != 2 or centres.shape[1] != 3:
            raise ValueError(f"coil centres must be (C, 3), got {centres.shape}")
        self.centres = centres
        self.radius = radius
        n = centres.shape[0]
        self.linear = rng.normal(scale=1.0, size=(n, 2))
        self.offset = rng.uniform(0, 2 * np.pi, size=n)

    def _distances(self, grid: Grid, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        du = (grid.u[None, :] - self.centres[:, 0, None]).astype(np.float32)[:, None, :]  # (C, 1, W)
        dv = (grid.v[None, :] - self.centres[:, 1, None]).astype(np.float32)[:, :, None]  # (C, H, 1)
        dz2 = ((z - self.centres[:, 2]) ** 2).astype(np.float32)[:, None, None]
        return du, dv, dz2

    def magnitude(self, grid: Grid, z: float) -> np.ndarray:
        """Sensitivity magnitudes ``(C, H, W)`` float32 at depth ``z``."""
        du, dv, dz2 = self._distances(grid, z)
        x = 1.0 + (du * du + dv * dv + dz2) / np.float32(self.radius**2)
        return 1.0 / (x * np.sqrt(x))

    def maps(self, grid: Grid, z: float) -> np.ndarray:
        """Complex sensitivities ``(C, H, W)`` complex64 at depth ``z``."""
        du, dv, _ = self._distances(grid, z)
        # exp(i * azimuth) without trigonometry: (du + i dv) / |(du, dv)|
        planar = np.sqrt(du * du + dv * dv)
        azimuth = (du + 1j * dv) / np.maximum(planar, np.float32(1e-6))
        ramp_u = np.exp(1j * self.linear[:, 0, None] * grid.u[None, :]).astype(np.complex64)[:, None, :]
        ramp_v = np.exp(1j * (self.linear[:, 1, None] * grid.v[None, :] + self.offset[:, None]))
        ramp_v = ramp_v.astype(np.complex64)[:, :, None]
        return (self.magnitude(grid, z) * azimuth * ramp_u * ramp_v).astype(np.complex64, copy=False)


class SmoothPhase:
    """Object phase ``exp(i (0.6 f(u, v, z) + phi0))`` with a smooth random field ``f``."""

    def __init__(self, rng: np.random.Generator, amplitude: float = 0.6):
        self.field = SmoothField(rng, 0.35, n_features=24)
        self.amplitude = amplitude
        self.phi0 = rng.uniform(0, 2 * np.pi)

    def slice(self, grid: Grid, z: float) -> np.ndarray:
        """Unit-modulus phase ``(H, W)`` complex64."""
        return np.exp(1j * (self.amplitude * self.field.slice(grid.u, grid.v, z) + self.phi0)).astype(np.complex64)
