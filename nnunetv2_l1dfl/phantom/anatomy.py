"""Analytic anatomy of the synthetic PSMA PET/CT phantom, rasterized onto any image grid.

Coordinates are DICOM patient coordinates (LPS) in millimetres: x grows to the patient's left, y
to posterior, z to the head. ``z = 0`` is the top of the pubic symphysis. Every structure is a union
of simple solids (ellipsoids, capsules, elliptic cylinders whose cross-section varies with z);
painting them in list order onto a grid gives a label map, and per-structure lookup tables give CT
(HU) and PET (SUVbw) values. Because the anatomy is analytic, the CT (fine grid, wide field of
view) and the PET (coarse grid) of one study are consistent by construction.

Arrays use SimpleITK's order: ``array[z, y, x]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Vec3 = tuple[float, float, float]


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """An axial image grid with identity direction (rows along +y, columns along +x, slices along +z).

    ``shape`` is (nz, ny, nx); ``spacing_mm`` and ``origin_mm`` are (x, y, z) as in ITK/DICOM;
    ``origin_mm`` is the centre of voxel [0, 0, 0].
    """

    shape: tuple[int, int, int]
    spacing_mm: Vec3
    origin_mm: Vec3

    @property
    def voxel_volume_ml(self) -> float:
        sx, sy, sz = self.spacing_mm
        return sx * sy * sz / 1000.0

    def axis_mm(self, axis: str) -> np.ndarray:
        """Voxel-centre coordinates (mm) along ``'x'``, ``'y'`` or ``'z'``."""
        i = "xyz".index(axis)
        n = self.shape[2 - i]
        return self.origin_mm[i] + self.spacing_mm[i] * np.arange(n, dtype=np.float64)

    def extent_mm(self) -> tuple[Vec3, Vec3]:
        """(low, high) voxel-centre coordinates (x, y, z) of the grid's corners."""
        lo = self.origin_mm
        hi = tuple(self.origin_mm[i] + self.spacing_mm[i] * (self.shape[2 - i] - 1) for i in range(3))
        return lo, hi  # type: ignore[return-value]

    def index_range(self, lo_mm: Sequence[float], hi_mm: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Array slices (z, y, x) of the voxels whose centres may lie in the box [lo, hi]; None if empty."""
        slices = []
        for i in (2, 1, 0):  # z, y, x
            n = self.shape[2 - i]
            a = math.floor((lo_mm[i] - self.origin_mm[i]) / self.spacing_mm[i])
            b = math.ceil((hi_mm[i] - self.origin_mm[i]) / self.spacing_mm[i]) + 1
            a, b = max(a, 0), min(b, n)
            if a >= b:
                return None
            slices.append(slice(a, b))
        return tuple(slices)  # type: ignore[return-value]

    def coordinates(self, region: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable voxel-centre coordinates (x, y, z) for the array region ``[z, y, x]``."""
        z = self.axis_mm("z")[region[0]][:, None, None]
        y = self.axis_mm("y")[region[1]][None, :, None]
        x = self.axis_mm("x")[region[2]][None, None, :]
        return x, y, z

    def supersampled(self, factor: int) -> Grid:
        """The grid with each voxel split into ``factor**3`` sub-voxels covering the same volume."""
        spacing = tuple(s / factor for s in self.spacing_mm)
        origin = tuple(o - s / 2 + f / 2 for o, s, f in zip(self.origin_mm, self.spacing_mm, spacing))
        shape = tuple(n * factor for n in self.shape)
        return Grid(shape, spacing, origin)  # type: ignore[arg-type]

    def physical_to_index(self, point_mm: Sequence[float]) -> tuple[float, float, float]:
        """Continuous array index (z, y, x) of a physical point."""
        return tuple((point_mm[i] - self.origin_mm[i]) / self.spacing_mm[i] for i in (2, 1, 0))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"shape_zyx": list(self.shape), "spacing_mm_xyz": list(self.spacing_mm),
                "origin_mm_xyz": list(self.origin_mm)}


# --------------------------------------------------------------------------------------------------
# Solids
# --------------------------------------------------------------------------------------------------
def rotation_matrix(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation about z (yaw), then y (pitch), then x (roll); columns are the rotated body axes."""
    a, b, c = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Ellipsoid:
    """Solid ellipsoid; ``rotation`` (3 x 3, columns = body axes in patient space) defaults to identity."""

    center_mm: Vec3
    semi_axes_mm: Vec3
    rotation: tuple[tuple[float, ...], ...] | None = None

    def bbox_mm(self) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(self.semi_axes_mm, dtype=np.float64)
        if self.rotation is None:
            half = a
        else:
            r = np.asarray(self.rotation)
            half = np.sqrt(((r * a[None, :]) ** 2).sum(axis=1))
        c = np.asarray(self.center_mm, dtype=np.float64)
        return c - half, c + half

    def normalized_radius_sq(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(d / a)^2 summed over the body axes: < 1 inside, 1 on the surface."""
        dx, dy, dz = x - self.center_mm[0], y - self.center_mm[1], z - self.center_mm[2]
        ax, ay, az = self.semi_axes_mm
        if self.rotation is None:
            return (dx / ax) ** 2 + (dy / ay) ** 2 + (dz / az) ** 2
        r = self.rotation
        u = dx * r[0][0] + dy * r[1][0] + dz * r[2][0]
        v = dx * r[0][1] + dy * r[1][1] + dz * r[2][1]
        w = dx * r[0][2] + dy * r[1][2] + dz * r[2][2]
        return (u / ax) ** 2 + (v / ay) ** 2 + (w / az) ** 2

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.normalized_radius_sq(x, y, z) <= 1.0

    def shrunk(self, by_mm: float) -> Ellipsoid:
        return Ellipsoid(self.center_mm, tuple(max(a - by_mm, 0.5) for a in self.semi_axes_mm), self.rotation)  # type: ignore[arg-type]

    def scaled(self, factor: float) -> Ellipsoid:
        return Ellipsoid(self.center_mm, tuple(a * factor for a in self.semi_axes_mm), self.rotation)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Capsule:
    """All points within ``radius_mm`` of the segment p0-p1 (vessels, bowel, long bones)."""

    p0_mm: Vec3
    p1_mm: Vec3
    radius_mm: float

    def bbox_mm(self) -> tuple[np.ndarray, np.ndarray]:
        p0, p1 = np.asarray(self.p0_mm), np.asarray(self.p1_mm)
        return np.minimum(p0, p1) - self.radius_mm, np.maximum(p0, p1) + self.radius_mm

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        p0, p1 = np.asarray(self.p0_mm), np.asarray(self.p1_mm)
        d = p1 - p0
        length_sq = float(d @ d) or 1e-12
        t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length_sq
        t = np.clip(t, 0.0, 1.0)
        dist_sq = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        return dist_sq <= self.radius_mm**2

    def shrunk(self, by_mm: float) -> Capsule:
        return Capsule(self.p0_mm, self.p1_mm, max(self.radius_mm - by_mm, 0.5))


@dataclass(frozen=True)
class ProfiledCylinder:
    """Elliptic cylinder along z whose centre and semi-axes are piecewise linear in z (body outline)."""

    z_knots_mm: tuple[float, ...]
    center_x_mm: tuple[float, ...]
    center_y_mm: tuple[float, ...]
    semi_x_mm: tuple[float, ...]
    semi_y_mm: tuple[float, ...]

    def bbox_mm(self) -> tuple[np.ndarray, np.ndarray]:
        cx, cy = np.asarray(self.center_x_mm), np.asarray(self.center_y_mm)
        ax, ay = np.asarray(self.semi_x_mm), np.asarray(self.semi_y_mm)
        lo = np.array([np.min(cx - ax), np.min(cy - ay), self.z_knots_mm[0]])
        hi = np.array([np.max(cx + ax), np.max(cy + ay), self.z_knots_mm[-1]])
        return lo, hi

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        zk = self.z_knots_mm
        zz = np.asarray(z)
        cx = np.interp(zz, zk, self.center_x_mm)
        cy = np.interp(zz, zk, self.center_y_mm)
        ax = np.interp(zz, zk, self.semi_x_mm)
        ay = np.interp(zz, zk, self.semi_y_mm)
        inside = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
        return inside & (zz >= zk[0]) & (zz <= zk[-1])

    def shrunk(self, by_mm: float) -> ProfiledCylinder:
        return ProfiledCylinder(self.z_knots_mm, self.center_x_mm, self.center_y_mm,
                                tuple(max(a - by_mm, 1.0) for a in self.semi_x_mm),
                                tuple(max(a - by_mm, 1.0) for a in self.semi_y_mm))


Solid = Ellipsoid | Capsule | ProfiledCylinder


# --------------------------------------------------------------------------------------------------
# Structures and the label map
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Structure:
    """A named tissue: union of solids with its CT value (HU) and PSMA PET uptake (SUVbw).

    ``kind`` is one of ``'body'``, ``'bone'``, ``'organ'``, ``'vessel'``, ``'lesion'``, ``'equipment'``
    (the CT table; not part of the patient).
    ``hot`` marks physiological uptake that lesions keep a distance from (so that each lesion's
    SUV peak is its own). ``rtstruct_name`` exports the structure as an RTSTRUCT ROI (organs only).
    """

    name: str
    solids: tuple[Solid, ...]
    hu: float
    suv: float
    kind: str = "organ"
    hot: bool = False
    rtstruct_name: str | None = None


def rasterize(structures: Sequence[Structure], grid: Grid) -> np.ndarray:
    """Paint structures in order (later ones win) on ``grid``; returns uint16 labels [z, y, x].

    Label 0 is air (outside every structure); label ``i + 1`` is ``structures[i]``. Solids are
    evaluated only inside their bounding boxes, so cost scales with the structures' sizes.
    """
    if len(structures) >= np.iinfo(np.uint16).max:
        raise ValueError(f"too many structures ({len(structures)}) for a uint16 label map")
    labels = np.zeros(grid.shape, dtype=np.uint16)
    for index, structure in enumerate(structures, start=1):
        for solid in structure.solids:
            region = grid.index_range(*solid.bbox_mm())
            if region is None:
                continue
            x, y, z = grid.coordinates(region)
            inside = np.broadcast_to(solid.contains(x, y, z), labels[region].shape)
            labels[region][inside] = index
    return labels


def solid_mask(solid: Solid, grid: Grid) -> np.ndarray:
    """Boolean mask [z, y, x] of the voxel centres of ``grid`` inside ``solid``."""
    mask = np.zeros(grid.shape, dtype=bool)
    region = grid.index_range(*solid.bbox_mm())
    if region is not None:
        x, y, z = grid.coordinates(region)
        mask[region] = np.broadcast_to(solid.contains(x, y, z), mask[region].shape)
    return mask


def lookup(structures: Sequence[Structure], attribute: str, background: float) -> np.ndarray:
    """Per-label table of ``attribute`` ('hu' or 'suv'); index 0 (air) gets ``background``."""
    return np.array([background] + [getattr(s, attribute) for s in structures], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# The patient
# --------------------------------------------------------------------------------------------------
#: Typical PSMA (18F-DCFPyL, ~120 min p.i.) SUVbw of normal tissue; patients vary around them.
PSMA_UPTAKE_SUV = {
    "fat": 0.25, "muscle": 0.6, "visceral_fat": 0.3, "lung": 0.3, "blood": 1.6, "marrow": 1.0,
    "cortical_bone": 0.5, "brain": 0.3, "heart": 2.0, "liver": 5.5, "spleen": 4.5, "kidney_cortex": 25.0,
    "kidney_pelvis": 12.0, "bladder": 15.0, "small_bowel": 5.5, "colon": 1.8, "rectum": 1.2,
    "prostate_bed": 0.9, "parotid": 16.0, "submandibular": 14.0, "spinal_canal": 0.4,
}

HU = {
    "fat": -100.0, "muscle": 45.0, "visceral_fat": -90.0, "lung": -850.0, "blood": 40.0, "marrow": 220.0,
    "cortical_bone": 750.0, "brain": 35.0, "heart": 40.0, "liver": 60.0, "spleen": 50.0,
    "kidney_cortex": 35.0, "kidney_pelvis": -20.0, "bladder": 8.0, "small_bowel": 25.0, "colon": -250.0,
    "rectum": -50.0, "prostate_bed": 40.0, "parotid": 20.0, "submandibular": 35.0, "spinal_canal": 15.0,
    "disc": 90.0,
}


@dataclass(frozen=True)
class PatientAnatomy:
    """Body-shape parameters of one patient (scales around a reference adult male)."""

    scale_lateral: float = 1.0
    scale_ap: float = 1.0
    scale_axial: float = 1.0
    fat_mm: float = 18.0
    bladder_fill: float = 1.0
    table_shift_mm: Vec3 = (0.0, 0.0, 0.0)
    uptake: dict[str, float] = field(default_factory=lambda: dict(PSMA_UPTAKE_SUV))

    def p(self, x: float, y: float, z: float) -> Vec3:
        """Reference-body point (mm) to this patient's coordinates."""
        sx, sy, sz = self.table_shift_mm
        return (x * self.scale_lateral + sx, y * self.scale_ap + sy, z * self.scale_axial + sz)

    def a(self, ax: float, ay: float, az: float) -> Vec3:
        """Reference semi-axes (mm) to this patient's size."""
        return (ax * self.scale_lateral, ay * self.scale_ap, az * self.scale_axial)

    def r(self, radius: float) -> float:
        return radius * math.sqrt(self.scale_lateral * self.scale_ap)


def _ell(pa: PatientAnatomy, c: Vec3, semi: Vec3, rot: np.ndarray | None = None) -> Ellipsoid:
    rotation = None if rot is None else tuple(tuple(float(v) for v in row) for row in rot)
    return Ellipsoid(pa.p(*c), pa.a(*semi), rotation)


def _cap(pa: PatientAnatomy, p0: Vec3, p1: Vec3, radius: float) -> Capsule:
    return Capsule(pa.p(*p0), pa.p(*p1), pa.r(radius))


def _polyline(pa: PatientAnatomy, points: Sequence[Vec3], radius: float) -> tuple[Capsule, ...]:
    return tuple(_cap(pa, p, q, radius) for p, q in zip(points[:-1], points[1:]))


# Reference trunk outline: z knots and semi-axes (mm); the head and neck are narrower.
_BODY_Z = (-90.0, 0.0, 80.0, 170.0, 260.0, 350.0, 450.0, 520.0, 545.0, 560.0, 610.0, 640.0, 700.0, 745.0)
_BODY_SX = (160.0, 165.0, 158.0, 150.0, 142.0, 150.0, 160.0, 165.0, 120.0, 58.0, 58.0, 72.0, 76.0, 40.0)
_BODY_SY = (110.0, 112.0, 108.0, 104.0, 106.0, 112.0, 115.0, 105.0, 80.0, 55.0, 58.0, 88.0, 92.0, 50.0)
_BODY_CY = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 15.0, 10.0, 5.0, 5.0, 5.0)

#: Vertebrae: (name, z of centre, body semi-axes x/y, half height, y of body centre) in the reference body.
_VERTEBRAE = (
    [("L5", 125.0, 25.0, 19.0, 12.0, 45.0), ("L4", 160.0, 25.0, 19.0, 12.0, 42.0),
     ("L3", 195.0, 24.0, 18.0, 12.0, 40.0), ("L2", 230.0, 23.0, 18.0, 12.0, 40.0),
     ("L1", 265.0, 22.0, 17.0, 12.0, 42.0)]
    + [(f"T{12 - i}", 298.0 + 24.0 * i, 19.0, 15.0, 10.0, 48.0 + 2.0 * min(i, 6)) for i in range(12)]
    + [(f"C{7 - i}", 570.0 + 14.0 * i, 13.0, 10.0, 6.0, 25.0) for i in range(6)]
)


def build_anatomy(pa: PatientAnatomy, bowel_rng: np.random.Generator) -> list[Structure]:
    """Normal anatomy of one patient, in painting order (later structures overwrite earlier ones).

    ``bowel_rng`` draws the small-bowel loop course; everything else follows ``pa``.
    """
    u, s = pa.uptake, []
    n = len(_BODY_Z)
    body = ProfiledCylinder(
        tuple(z * pa.scale_axial + pa.table_shift_mm[2] for z in _BODY_Z),
        tuple(pa.table_shift_mm[0] for _ in range(n)),
        tuple(cy * pa.scale_ap + pa.table_shift_mm[1] for cy in _BODY_CY),
        tuple(a * pa.scale_lateral for a in _BODY_SX),
        tuple(a * pa.scale_ap for a in _BODY_SY),
    )
    thighs = tuple(_cap(pa, (sx * 88.0, 0.0, -60.0), (sx * 80.0, 5.0, -400.0), 78.0) for sx in (-1, 1))
    thigh_muscle = tuple(c.shrunk(pa.fat_mm) for c in thighs)
    s.append(Structure("subcutaneous_fat", (body, *thighs), HU["fat"], u["fat"], kind="body"))
    s.append(Structure("muscle", (body.shrunk(pa.fat_mm), *thigh_muscle), HU["muscle"], u["muscle"], kind="body"))
    # Abdominal cavity with visceral fat (organs are painted into it).
    s.append(Structure("visceral_fat", (_ell(pa, (0, -15, 170), (125, 80, 150)),), HU["visceral_fat"],
                       u["visceral_fat"], kind="body"))

    # Thorax: lungs with their bases reaching into the upper abdomen posteriorly, heart.
    lungs = tuple(_ell(pa, (sx * 78, 15, 410), (62, 88, 150)) for sx in (-1, 1))
    s.append(Structure("lungs", lungs, HU["lung"], u["lung"], kind="organ"))
    s.append(Structure("heart", (_ell(pa, (22, -25, 450), (58, 52, 60)),), HU["heart"], u["heart"]))

    # Head: brain, salivary glands.
    s.append(Structure("skull", (_ell(pa, (0, 5, 690), (72, 86, 60)),), HU["cortical_bone"], u["cortical_bone"],
                       kind="bone"))
    s.append(Structure("brain", (_ell(pa, (0, 5, 692), (66, 80, 54)),), HU["brain"], u["brain"]))
    s.append(Structure("parotid_glands", tuple(_ell(pa, (sx * 50, 15, 640), (14, 20, 24)) for sx in (-1, 1)),
                       HU["parotid"], u["parotid"], hot=True))
    s.append(Structure("submandibular_glands", tuple(_ell(pa, (sx * 36, -30, 605), (12, 12, 11)) for sx in (-1, 1)),
                       HU["submandibular"], u["submandibular"], hot=True))

    # Skeleton: cortex then marrow (3 mm cortical shell), discs between vertebral bodies.
    for name, zc, ax, ay, half_h, yc in _VERTEBRAE:
        body_e = _ell(pa, (0, yc, zc), (ax, ay, half_h))
        spinous = _ell(pa, (0, yc + ay + 30, zc - 4), (6, 16, half_h * 0.8))
        laminae = tuple(_ell(pa, (sx * ax * 0.55, yc + ay + 10, zc), (7, 9, half_h * 0.8)) for sx in (-1, 1))
        s.append(Structure(f"vertebra_{name}_cortex", (body_e, spinous, *laminae), HU["cortical_bone"],
                           u["cortical_bone"], kind="bone"))
        s.append(Structure(f"vertebra_{name}", (body_e.shrunk(3.0),), HU["marrow"], u["marrow"], kind="bone"))
        s.append(Structure(f"disc_{name}", (_ell(pa, (0, yc, zc + half_h + 2.5), (ax * 0.95, ay * 0.95, 2.6)),),
                           HU["disc"], u["muscle"], kind="bone"))
        s.append(Structure(f"spinal_canal_{name}", (_ell(pa, (0, yc + ay + 11, zc), (9, 8, half_h + 3)),),
                           HU["spinal_canal"], u["spinal_canal"], kind="organ"))

    rot_l, rot_r = rotation_matrix(yaw_deg=-35, roll_deg=-12), rotation_matrix(yaw_deg=35, roll_deg=-12)
    iliac = (_ell(pa, (-92, 38, 150), (11, 52, 58), rot_r), _ell(pa, (92, 38, 150), (11, 52, 58), rot_l))
    sacrum = _ell(pa, (0, 72, 65), (42, 22, 62), rotation_matrix(roll_deg=-25))
    femoral_heads = tuple(_ell(pa, (sx * 88, 8, 8), (24, 24, 24)) for sx in (-1, 1))
    femurs = tuple(_cap(pa, (sx * 92, 8, 0), (sx * 115, 12, -60), 15.0) for sx in (-1, 1)) + tuple(
        _cap(pa, (sx * 115, 12, -60), (sx * 100, 18, -400), 14.0) for sx in (-1, 1))
    ischia = tuple(_ell(pa, (sx * 55, 32, -22), (14, 24, 30)) for sx in (-1, 1))
    pubic_rami = tuple(_cap(pa, (sx * 12, -48, -5), (sx * 70, -8, 12), 10.0) for sx in (-1, 1))
    pelvic_bones = (
        ("ilium_R", (iliac[0],)), ("ilium_L", (iliac[1],)), ("sacrum", (sacrum,)),
        ("femur_R", (femoral_heads[0], femurs[0], femurs[2])), ("femur_L", (femoral_heads[1], femurs[1], femurs[3])),
        ("ischium_R", (ischia[0],)), ("ischium_L", (ischia[1],)), ("pubis", pubic_rami),
    )
    for name, solids in pelvic_bones:
        s.append(Structure(f"{name}_cortex", solids, HU["cortical_bone"], u["cortical_bone"], kind="bone"))
        s.append(Structure(name, tuple(sd.shrunk(3.0) for sd in solids), HU["marrow"], u["marrow"], kind="bone"))

    # Vessels: aorta, its bifurcation and the iliac arteries (pelvic nodes lie along them), IVC.
    s.append(Structure("aorta", _polyline(pa, [(12, 0, 500), (14, 0, 300), (6, 5, 150)], 11.0), HU["blood"],
                       u["blood"], kind="vessel"))
    s.append(Structure("ivc", _polyline(pa, [(-22, 8, 320), (-18, 10, 150)], 11.0), HU["blood"], u["blood"],
                       kind="vessel"))
    for side in ("R", "L"):
        pts = iliac_vessel_points(side)
        s.append(Structure(f"iliac_arteries_{side}", _polyline(pa, pts["common"], 7.0)
                           + _polyline(pa, pts["external"], 6.0) + _polyline(pa, pts["internal"], 5.0),
                           HU["blood"], u["blood"], kind="vessel"))

    # Abdominal organs.
    s.append(Structure("liver", (_ell(pa, (-72, 0, 330), (95, 88, 92)),), HU["liver"], u["liver"], hot=True,
                       rtstruct_name="Liver"))
    s.append(Structure("spleen", (_ell(pa, (92, 55, 320), (34, 45, 52)),), HU["spleen"], u["spleen"], hot=True,
                       rtstruct_name="Spleen"))
    for side, sx in (("R", -1), ("L", 1)):
        kidney = _ell(pa, (sx * 80, 48, 217 if side == "R" else 225), (28, 24, 55),
                      rotation_matrix(yaw_deg=sx * 25))
        s.append(Structure(f"kidney_{side}", (kidney,), HU["kidney_cortex"], u["kidney_cortex"], hot=True,
                           rtstruct_name=f"Kidney_{side}"))
        s.append(Structure(f"kidney_{side}_pelvis", (kidney.scaled(0.45),), HU["kidney_pelvis"], u["kidney_pelvis"],
                           hot=True))
    s.append(Structure("colon", _polyline(pa, [(-95, 5, 90), (-100, 0, 250), (-40, -60, 270), (40, -60, 270),
                                               (100, 10, 260), (95, 15, 110), (40, 40, 70), (5, 50, 45)], 20.0),
                       HU["colon"], u["colon"], hot=True))
    s.append(Structure("small_bowel", small_bowel_loops(pa, bowel_rng), HU["small_bowel"], u["small_bowel"],
                       hot=True))
    s.append(Structure("rectum", _polyline(pa, [(0, 45, -45), (0, 52, 10), (4, 52, 45)], 16.0), HU["rectum"],
                       u["rectum"], hot=False))
    fill = pa.bladder_fill
    s.append(Structure("bladder", (_ell(pa, (0, -42, 38 + 10 * (fill - 1)), (44 * fill, 34 * fill, 33 * fill)),),
                       HU["bladder"], u["bladder"], hot=True, rtstruct_name="Bladder"))
    s.append(Structure("prostate_bed", (_ell(pa, (0, 10, -18), (17, 14, 14)),), HU["prostate_bed"],
                       u["prostate_bed"]))
    return s


def iliac_vessel_points(side: str) -> dict[str, list[Vec3]]:
    """Reference-body polylines of the common, external and internal iliac arteries of one side."""
    sx = -1.0 if side == "R" else 1.0
    bif = (sx * 45.0, 18.0, 100.0)
    return {
        "common": [(6.0, 5.0, 150.0), bif],
        "external": [bif, (sx * 68.0, 0.0, 50.0), (sx * 80.0, -15.0, 0.0)],
        "internal": [bif, (sx * 52.0, 42.0, 55.0), (sx * 45.0, 40.0, 20.0)],
    }


def small_bowel_loops(pa: PatientAnatomy, rng: np.random.Generator, n_points: int = 14) -> tuple[Capsule, ...]:
    """A random serpentine small-bowel course in the lower abdomen (radius 13 mm)."""
    points: list[Vec3] = []
    z_levels = np.linspace(215.0, 100.0, n_points)
    for i, z in enumerate(z_levels):
        x = (-55.0 if i % 2 == 0 else 55.0) + rng.uniform(-15, 15)
        y = rng.uniform(-65, -20)
        points.append((float(x), float(y), float(z + rng.uniform(-6, 6))))
    return _polyline(pa, points, 13.0)


# --------------------------------------------------------------------------------------------------
# Lesion sites
# --------------------------------------------------------------------------------------------------
LESION_SITES = ("prostate_bed", "pelvic_node", "bone")


def lesion_center_candidate(site: str, pa: PatientAnatomy, structures: Sequence[Structure],
                            rng: np.random.Generator) -> tuple[Vec3, str]:
    """One random lesion centre (mm) for ``site`` and a human-readable location.

    - ``prostate_bed``: around the vesico-urethral anastomosis below the bladder.
    - ``pelvic_node``: beside a common, external or internal iliac artery, or presacral.
    - ``bone``: inside the marrow of a pelvic bone, the sacrum or a lumbar/lower thoracic vertebra.
    """
    if site == "prostate_bed":
        c = rng.normal((0.0, 8.0, -14.0), (6.0, 5.0, 5.0))
        return pa.p(*c), "prostate bed"
    if site == "pelvic_node":
        side = "R" if rng.random() < 0.5 else "L"
        chain = rng.choice(["common", "external", "internal", "presacral"], p=[0.2, 0.4, 0.3, 0.1])
        if chain == "presacral":
            return pa.p(rng.normal(0, 8), 42.0 + rng.normal(0, 4), rng.uniform(80, 120)), "presacral node"
        pts = np.asarray(iliac_vessel_points(side)[chain])
        seg = int(rng.integers(len(pts) - 1))
        t = rng.uniform(0.1, 0.9)
        on_vessel = pts[seg] + t * (pts[seg + 1] - pts[seg])
        # Nodes sit beside the vessel: offset perpendicular-ish, laterally or anteriorly.
        direction = rng.normal(size=3)
        direction[2] *= 0.3
        direction /= np.linalg.norm(direction) or 1.0
        c = on_vessel + direction * rng.uniform(14.0, 20.0)
        return pa.p(*c), f"{chain} iliac node ({side})"
    if site == "bone":
        bones = [st for st in structures if st.kind == "bone" and not st.name.endswith("_cortex")
                 and not st.name.startswith(("disc_", "skull"))]
        st = bones[int(rng.integers(len(bones)))]
        solid = st.solids[int(rng.integers(len(st.solids)))]
        lo, hi = solid.bbox_mm()
        for _ in range(200):
            point = rng.uniform(lo, hi)
            if bool(solid.contains(*(np.asarray(v) for v in point))):
                return tuple(float(v) for v in point), f"bone ({st.name})"  # type: ignore[return-value]
        return tuple(float(v) for v in (lo + hi) / 2), f"bone ({st.name})"  # type: ignore[return-value]
    raise ValueError(f"unknown lesion site {site!r}; choose from {LESION_SITES}")
