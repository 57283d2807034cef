"""Render one planned study into images: PET in SUVbw, CT in HU, lesion and organ masks.

PET: the tissue uptake map is painted on a 2x supersampled grid, blurred with a Gaussian of the
preset's FWHM (scanner resolution), averaged back to the PET grid (partial volume), and each
lesion's own blurred activity is added with the amplitude that gives it exactly its drawn SUVmax.
Then spatially correlated noise whose variance grows with the local uptake (as in Poisson-limited
reconstructions) is added and negatives are clipped. CT: the same anatomy painted directly on
the finer CT grid, slightly blurred, with 10 HU noise.

The lesion mask is defined on the PET grid (voxel centres inside the lesion ellipsoid); each
lesion keeps 10 mm away from organs with high physiological uptake and 2 voxels away from other
lesions, so its SUV peak is its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from nnunetv2_l1dfl.phantom.anatomy import (
    Ellipsoid,
    Grid,
    ProfiledCylinder,
    Structure,
    build_anatomy,
    lesion_center_candidate,
    lookup,
    rasterize,
    rotation_matrix,
    solid_mask,
)
from nnunetv2_l1dfl.phantom.cohort import LESION_SITE_PROBABILITIES, SizePreset, StudySpec

logger = logging.getLogger(__name__)

HOT_ORGAN_MARGIN_MM = 10.0
LESION_GAP_VOXELS = 2
PLACEMENT_ATTEMPTS = 300
PET_NOISE_LEVEL = 0.2  # noise sd = level * sqrt(SUV) (SUV 1: 20 %, SUV 10: 6 %)
CT_NOISE_HU = 10.0
SUPERSAMPLING = 2


class PhantomError(RuntimeError):
    """A study that cannot be rendered as planned (e.g. no room for a lesion); names the study."""


@dataclass(frozen=True)
class PlacedLesion:
    """A lesion on the PET grid: its solid, its site and location text, and its voxel mask."""

    spec_index: int
    site: str
    location: str
    solid: Ellipsoid
    mask: np.ndarray  # bool [z, y, x] on the PET grid


@dataclass
class RenderedStudy:
    """Images of one study. ``pet_suv`` float32 [z, y, x] before quantization; ``ct_hu`` int16;
    ``lesion_labels`` uint8 with lesion i (0-based in ``lesions``) as value i + 1."""

    pet_grid: Grid
    ct_grid: Grid
    pet_suv: np.ndarray
    ct_hu: np.ndarray
    lesion_labels: np.ndarray
    lesions: list[PlacedLesion]
    lesion_amplitudes: list[float]
    organ_masks: dict[str, np.ndarray]


def study_grids(spec: StudySpec, preset: SizePreset) -> tuple[Grid, Grid]:
    """PET and CT grids of a study. The PET field of view is centred on the gantry axis (x = y = 0);
    the CT has a wider field of view centred 10 mm lower (table side) and covers the PET axially
    with ``ct_z_margin_mm`` to spare on both ends."""
    nz, ny, nx = preset.pet_shape_zyx
    sx, sy, sz = preset.pet_spacing_mm
    z0 = spec.anatomy.table_shift_mm[2] + preset.pet_z_start_mm * spec.anatomy.scale_axial
    pet = Grid((nz, ny, nx), (sx, sy, sz), (-(nx - 1) * sx / 2, -(ny - 1) * sy / 2, round(z0, 2)))
    cx, cy, cz = preset.ct_spacing_mm
    n = preset.ct_inplane_px
    z_lo = pet.origin_mm[2] - preset.ct_z_margin_mm
    z_hi = pet.origin_mm[2] + (nz - 1) * sz + preset.ct_z_margin_mm
    ct_nz = int(math.ceil((z_hi - z_lo) / cz)) + 1
    ct = Grid((ct_nz, n, n), (cx, cy, cz), (-(n - 1) * cx / 2, -(n - 1) * cy / 2 + 10.0, round(z_lo, 2)))
    return pet, ct


def _fit_volume(solid: Ellipsoid, grid: Grid, target_voxels: float) -> tuple[Ellipsoid, np.ndarray]:
    """Scale ``solid`` so that the number of voxel centres inside it is as close as possible to target."""
    def count(f: float) -> tuple[int, np.ndarray]:
        mask = solid_mask(solid.scaled(f), grid)
        return int(mask.sum()), mask

    lo, hi = 0.2, 3.0
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        if count(mid)[0] >= target_voxels:
            hi = mid
        else:
            lo = mid
    n_hi, mask_hi = count(hi)
    n_lo, mask_lo = count(lo)
    if n_lo >= 1 and abs(n_lo - target_voxels) < abs(n_hi - target_voxels):
        return solid.scaled(lo), mask_lo
    return solid.scaled(hi), mask_hi


def place_lesions(spec: StudySpec, structures: list[Structure], pet_grid: Grid, pet_labels: np.ndarray,
                  rng: np.random.Generator) -> list[PlacedLesion]:
    """Put every planned lesion somewhere plausible on the PET grid, or raise PhantomError.

    A lesion lies inside the body, outside lungs and the 10 mm margin around hot organs, two voxels
    from other lesions and the field-of-view border. When its site has no room after
    ``PLACEMENT_ATTEMPTS`` tries, the other sites are tried (and the switch is logged).
    """
    from scipy.ndimage import binary_dilation, distance_transform_edt

    spacing_zyx = pet_grid.spacing_mm[::-1]
    hot = np.isin(pet_labels, [i + 1 for i, s in enumerate(structures) if s.hot])
    lungs = np.isin(pet_labels, [i + 1 for i, s in enumerate(structures) if s.name == "lungs"])
    inside_body = np.isin(pet_labels, [i + 1 for i, s in enumerate(structures)
                                      if s.kind in ("body", "organ", "bone", "vessel")])
    forbidden = (~inside_body) | lungs
    if hot.any():
        forbidden |= distance_transform_edt(~hot, sampling=spacing_zyx) <= HOT_ORGAN_MARGIN_MM
    border = np.ones(pet_grid.shape, dtype=bool)
    border[2:-2, 2:-2, 2:-2] = False
    forbidden |= border
    occupied = np.zeros(pet_grid.shape, dtype=bool)
    structure_gap = np.ones((3, 3, 3), dtype=bool)

    placed: list[PlacedLesion] = []
    for index, lesion in enumerate(spec.lesions):
        sites = [lesion.site] + [s for s in LESION_SITE_PROBABILITIES if s != lesion.site]
        target_voxels = lesion.target_volume_ml / pet_grid.voxel_volume_ml
        result = None
        near_lesions = binary_dilation(occupied, structure_gap, iterations=LESION_GAP_VOXELS)
        for site in sites:
            for _ in range(PLACEMENT_ATTEMPTS):
                center, location = lesion_center_candidate(site, spec.anatomy, structures, rng)
                idx = np.round(pet_grid.physical_to_index(center)).astype(int)
                if np.any(idx < 0) or np.any(idx >= np.asarray(pet_grid.shape)) or forbidden[tuple(idx)]:
                    continue
                radius = (3.0 * lesion.target_volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
                aspect = np.exp(rng.normal(0.0, 0.15, size=3))
                aspect /= np.prod(aspect) ** (1.0 / 3.0)
                rotation = rotation_matrix(*rng.uniform(-90, 90, size=3))
                solid = Ellipsoid(tuple(float(c) for c in center), tuple(float(a) for a in radius * aspect),
                                  tuple(tuple(float(v) for v in row) for row in rotation))
                if (solid_mask(solid, pet_grid) & forbidden).any():  # cheap test before fitting the volume
                    continue
                solid, mask = _fit_volume(solid, pet_grid, target_voxels)
                if not mask.any() or (mask & forbidden).any():
                    continue
                if (mask & near_lesions).any():
                    continue
                result = PlacedLesion(index, site, location, solid, mask)
                break
            if result is not None:
                break
            logger.debug("%s: no room for a %s lesion of %.2f ml, trying another site",
                         spec.study_folder, site, lesion.target_volume_ml)
        if result is None:
            raise PhantomError(f"study {spec.study_folder}: no room for lesion {index + 1} "
                               f"({lesion.target_volume_ml:.2f} ml) at any site after {PLACEMENT_ATTEMPTS} tries each")
        if result.site != lesion.site:
            logger.info("%s: lesion %d placed as %s instead of %s (no room)", spec.study_folder, index + 1,
                        result.site, lesion.site)
        occupied |= result.mask
        placed.append(result)
    return placed


def _blur_and_pool(fine: np.ndarray, fine_grid: Grid, fwhm_mm: float, factor: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = [fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / s for s in fine_grid.spacing_mm[::-1]]
    blurred = gaussian_filter(fine.astype(np.float64), sigma, mode="constant")
    nz, ny, nx = (n // factor for n in fine.shape)
    return blurred.reshape(nz, factor, ny, factor, nx, factor).mean(axis=(1, 3, 5))


def _lesion_profile(solid: Ellipsoid, grid: Grid) -> np.ndarray:
    """Lesion activity on ``grid``: 1 at the centre falling to 0.6 at the rim (a hotter core)."""
    out = np.zeros(grid.shape, dtype=np.float32)
    region = grid.index_range(*solid.bbox_mm())
    if region is not None:
        x, y, z = grid.coordinates(region)
        rho_sq = solid.normalized_radius_sq(x, y, z)
        out[region] = np.where(rho_sq <= 1.0, 1.0 - 0.4 * rho_sq, 0.0)
    return out


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float = 0.7) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed over ~1 voxel (reconstruction correlates neighbours)."""
    from scipy.ndimage import gaussian_filter

    white = rng.standard_normal(shape)
    smooth = gaussian_filter(white, sigma_vox, mode="wrap")
    return smooth / smooth.std()


def render_study(spec: StudySpec, preset: SizePreset) -> RenderedStudy:
    """Render PET (SUVbw), CT (HU), lesion labels and organ masks of one study (deterministic)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(np.random.SeedSequence(list(spec.render_entropy)))
    structures = build_anatomy(spec.anatomy, np.random.default_rng(np.random.SeedSequence([*spec.render_entropy, 7])))
    pet_grid, ct_grid = study_grids(spec, preset)
    pet_labels = rasterize(structures, pet_grid)
    lesions = place_lesions(spec, structures, pet_grid, pet_labels, rng)

    # PET: tissue uptake, blurred and pooled; then lesions scaled to their SUVmax; then noise.
    fine_grid = pet_grid.supersampled(SUPERSAMPLING)
    fine_suv = lookup(structures, "suv", 0.0)[rasterize(structures, fine_grid)]
    pet = _blur_and_pool(fine_suv, fine_grid, preset.pet_fwhm_mm, SUPERSAMPLING)
    amplitudes = []
    for placed in lesions:
        spread = _blur_and_pool(_lesion_profile(placed.solid, fine_grid), fine_grid, preset.pet_fwhm_mm, SUPERSAMPLING)
        target = spec.lesions[placed.spec_index].target_suv_max
        background_max = float(pet[placed.mask].max())
        if target < 1.5 * background_max:  # keep every lesion visible above what it sits in
            logger.info("%s: lesion %d SUVmax raised from %.2f to %.2f (1.5 x its background)",
                        spec.study_folder, placed.spec_index + 1, target, 1.5 * background_max)
            target = 1.5 * background_max
        s = spread[placed.mask]
        b = pet[placed.mask]
        positive = s > 0
        # max over the mask of (b + c s) == target  <=>  c = min over voxels of (target - b) / s.
        amplitude = float(np.min((target - b[positive]) / s[positive]))
        pet += amplitude * spread
        amplitudes.append(amplitude)
    noise = _correlated_noise(rng, pet.shape)
    pet = np.clip(pet + PET_NOISE_LEVEL * np.sqrt(np.clip(pet, 0.0, None)) * noise, 0.0, None).astype(np.float32)

    # CT: anatomy plus lesions (sclerotic bone metastases, soft-tissue nodes) on the CT grid.
    lesion_structures = [Structure(f"lesion_{p.spec_index + 1}", (p.solid,), spec.lesions[p.spec_index].hu, 0.0,
                                   kind="lesion") for p in lesions]
    ct_structures = structures + lesion_structures + [_table(spec, ct_grid)]
    ct = lookup(ct_structures, "hu", -1000.0)[rasterize(ct_structures, ct_grid)]
    ct = gaussian_filter(ct, 0.6) + CT_NOISE_HU * rng.standard_normal(ct.shape)
    ct_hu = np.clip(np.round(ct), -1024, 3071).astype(np.int16)

    lesion_labels = np.zeros(pet_grid.shape, dtype=np.uint8)
    for i, placed in enumerate(lesions, start=1):
        lesion_labels[placed.mask] = i
    organ_masks: dict[str, np.ndarray] = {}
    for i, structure in enumerate(structures, start=1):
        if structure.rtstruct_name:
            organ_masks[structure.rtstruct_name] = (pet_labels == i)
    for name, mask in list(organ_masks.items()):
        if name.startswith("Kidney_"):  # the renal pelvis is part of the kidney ROI
            side = name.split("_")[1]
            pelvis = [i for i, s in enumerate(structures, start=1) if s.name == f"kidney_{side}_pelvis"]
            organ_masks[name] = mask | np.isin(pet_labels, pelvis)
        organ_masks[name] &= lesion_labels == 0
        if not organ_masks[name].any():
            del organ_masks[name]
    return RenderedStudy(pet_grid, ct_grid, pet, ct_hu, lesion_labels, lesions, amplitudes, organ_masks)


def _table(spec: StudySpec, ct_grid: Grid) -> Structure:
    """The patient table under the back (CT only: no PET uptake)."""
    a = spec.anatomy
    y_back = a.table_shift_mm[1] + 116.0 * a.scale_ap
    lo, hi = ct_grid.extent_mm()
    table = ProfiledCylinder((lo[2] - 10, hi[2] + 10), (0.0, 0.0), (y_back + 14.0, y_back + 14.0), (230.0, 230.0),
                             (8.0, 8.0))
    return Structure("table", (table,), 150.0, 0.0, kind="equipment")
