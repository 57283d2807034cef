"""Resampling onto the PET grid: CT with linear interpolation, label maps without losing lesions.

CT outside its field of view becomes -1024 HU (air), and ``ct_coverage_fraction`` says how much of
the PET grid the CT covers. Label maps are resampled per label as a linearly interpolated fraction
map thresholded at 0.5 (a smoother nearest neighbour: a reference voxel gets the label when its
centre lies in it). Whether a lesion (3D connected component, 18-connectivity) survives is decided
on a second map, the true volume fraction of each reference voxel that the lesion covers: a lesion
that lies between reference voxel centres reaches no centre, however much finer the mask grid is,
but it still overlaps voxels. A lesion that leaves no voxel at the threshold keeps the reference
voxel holding the largest part of it; it is lost only when it lies outside the reference grid (or
every voxel it overlaps holds another label). The report says how many lesions there were before
and after, and how many were lost, rescued or merged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_l1dfl.conversion.geometry import geometry_mismatch, snap_to_grid

if TYPE_CHECKING:
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.masks import MaskOptions, MaskStructure

logger = logging.getLogger(__name__)

CT_OUTSIDE_HU = -1024.0
MASK_THRESHOLD = 0.5
LESION_CONNECTIVITY = 18
# Directions that agree within this are treated as one set of axes (exact separable overlap);
# anything else goes through sub-voxel point sampling.
ALIGNED_DIRECTION_TOL = 1e-4
# Point sampling (non-aligned grids): sub-points per reference-voxel edge, and the cap per source edge.
SAMPLES_PER_REFERENCE_EDGE = 8
MAX_SAMPLES_PER_SOURCE_EDGE = 16
TOUCH_MM = 1e-6  # interval overlaps below this are rounding noise of voxels that only touch
SOURCE_SLAB = 64  # source slices per block of the separable overlap (bounds memory on big lesions)
POINT_BLOCK = 1 << 21  # sample points per block of the point sampling


@dataclass
class MaskResampleReport:
    """Lesion bookkeeping of one ``resample_mask_to`` call, summed over labels.

    lesions_before / lesions_after: 3D connected components (18-connectivity) per label in the input
    and in the output (lesions that merge on the coarser grid count once after). rescued_lesions:
    lesions that would have vanished at the 0.5 threshold and were kept as the reference voxel
    holding the largest part of them. lost_lesions: lesions with no voxel in the output, either
    because they lie entirely outside the reference grid or because every reference voxel they
    overlap went to another label; ``messages`` says which. merged_lesions: per label, lesions
    before minus lost minus lesions after, when positive (neighbours joined on the coarser grid;
    a net count, a lesion that splits in two offsets one merge).
    """

    lesions_before: int
    lesions_after: int
    lost_lesions: int
    rescued_lesions: int = 0
    merged_lesions: int = 0
    messages: list[str] = field(default_factory=list)


def same_geometry(a: sitk.Image, b: sitk.Image, tol_mm: float = 1e-3) -> bool:
    """True when two images share size, spacing, origin (within ``tol_mm``) and direction (1e-5)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol_mm)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-5)
    )


def resample_ct_to(ct: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """CT resampled onto ``reference``'s grid: float32 HU, linear, -1024 HU outside the CT."""
    import SimpleITK as sitk

    return sitk.Resample(
        sitk.Cast(ct, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, CT_OUTSIDE_HU, sitk.sitkFloat32
    )


def ct_coverage_fraction(ct: sitk.Image, reference: sitk.Image) -> float:
    """Fraction (0..1) of ``reference`` voxel centres that fall inside the CT's field of view.

    A voxel centre is inside when it lies within half a voxel of the CT's outermost voxel centres,
    the same rule the interpolators use.
    """
    import SimpleITK as sitk

    ones = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    ones.CopyInformation(ct)
    ones = ones + 1
    covered = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return float(sitk.GetArrayViewFromImage(covered).mean())


def _component_box_on_reference(
    source: sitk.Image, lo: np.ndarray, hi: np.ndarray, reference: sitk.Image
) -> tuple[np.ndarray, np.ndarray] | None:
    """Index box (start, stop exclusive; x, y, z order) of ``reference`` around a source index box."""
    corners = []
    for cx in (lo[0] - 0.5, hi[0] + 0.5):
        for cy in (lo[1] - 0.5, hi[1] + 0.5):
            for cz in (lo[2] - 0.5, hi[2] + 0.5):
                point = source.TransformContinuousIndexToPhysicalPoint((float(cx), float(cy), float(cz)))
                corners.append(reference.TransformPhysicalPointToContinuousIndex(point))
    corners = np.asarray(corners)
    start = np.maximum(np.floor(corners.min(0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, np.asarray(reference.GetSize()))
    if np.any(stop <= start):
        return None
    return start, stop


def _geometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction 3x3 with the axes as columns) of an image, as float64 arrays."""
    return (
        np.asarray(image.GetOrigin(), dtype=np.float64),
        np.asarray(image.GetSpacing(), dtype=np.float64),
        np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
    )


def _overlap_matrix(offset_mm: float, source_spacing: float, source_index: np.ndarray,
                    reference_spacing: float, reference_index: np.ndarray) -> np.ndarray:  # fmt: skip
    """(reference voxels, source voxels) overlap along one shared axis, as a fraction of a reference voxel.

    offset_mm: position of the source voxel 0 centre along the axis, relative to the reference
    origin. Voxel k of either grid spans its centre +- half its spacing.
    """
    source_lo = offset_mm + source_spacing * (source_index - 0.5)
    reference_lo = reference_spacing * (reference_index - 0.5)
    overlap = np.minimum(source_lo[None, :] + source_spacing, reference_lo[:, None] + reference_spacing) - np.maximum(
        source_lo[None, :], reference_lo[:, None]
    )
    # Voxels that only touch (overlap at rounding level) do not overlap.
    overlap[overlap < TOUCH_MM] = 0.0
    return (overlap / reference_spacing).astype(np.float32)


def _fraction_separable(binary: np.ndarray, lo: np.ndarray, source: sitk.Image, reference: sitk.Image,
                        start: np.ndarray, stop: np.ndarray) -> np.ndarray:  # fmt: skip
    """Exact volume fraction of each reference voxel in ``start:stop`` covered by ``binary``.

    Only for grids that share their axes (same direction): the overlap of two boxes is then the
    product of three 1D interval overlaps, so the fraction map is the binary mask multiplied by one
    overlap matrix per axis. binary: (z, y, x) block of the source whose first voxel has the source
    index ``lo`` (x, y, z); start, stop: reference index box (x, y, z). Returns (z, y, x) float32.
    """
    source_origin, source_spacing, direction = _geometry(source)
    reference_origin, reference_spacing, _ = _geometry(reference)
    offset = direction.T @ (source_origin - reference_origin)  # source voxel 0 along the shared axes
    wx, wy, wz = (
        _overlap_matrix(offset[d], source_spacing[d], lo[d] + np.arange(binary.shape[2 - d]),
                        reference_spacing[d], np.arange(start[d], stop[d]))  # fmt: skip
        for d in range(3)
    )
    out = np.zeros((wz.shape[0], wy.shape[0], wx.shape[0]), dtype=np.float32)
    for z0 in range(0, binary.shape[0], SOURCE_SLAB):
        slab = binary[z0 : z0 + SOURCE_SLAB].astype(np.float32) @ wx.T  # (slices, y, reference x)
        slab = np.matmul(wy, slab)  # (slices, reference y, reference x)
        out += np.tensordot(wz[:, z0 : z0 + SOURCE_SLAB], slab, axes=(1, 0))
    return out


def _fraction_sampled(binary: np.ndarray, lo: np.ndarray, source: sitk.Image, reference: sitk.Image,
                      start: np.ndarray, stop: np.ndarray) -> np.ndarray:  # fmt: skip
    """Volume fraction of each reference voxel in ``start:stop`` covered by ``binary``, any directions.

    Every foreground source voxel is split into a regular grid of sub-points (enough for about
    :data:`SAMPLES_PER_REFERENCE_EDGE` per reference voxel edge); each sub-point is mapped through
    the physical space into the reference grid and counted in the voxel that contains it; a count
    times the sub-point volume over the reference voxel volume is the fraction (capped at 1: the
    count of a fully covered voxel jitters by a layer of sub-points). Arguments as
    :func:`_fraction_separable`.
    """
    source_origin, source_spacing, source_direction = _geometry(source)
    reference_origin, reference_spacing, reference_direction = _geometry(reference)
    # Continuous source index (x, y, z) -> continuous reference index, one affine map.
    to_reference = (reference_direction.T @ source_direction * source_spacing) / reference_spacing[:, None]
    shift = reference_direction.T @ (source_origin - reference_origin) / reference_spacing
    per_edge = np.clip(
        np.ceil(SAMPLES_PER_REFERENCE_EDGE * source_spacing / reference_spacing.min()), 1, MAX_SAMPLES_PER_SOURCE_EDGE
    ).astype(int)
    axes = [(np.arange(n) + 0.5) / n - 0.5 for n in per_edge]
    sub = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3) @ to_reference.T
    shape = (stop - start)[::-1]  # z, y, x
    counts = np.zeros(int(np.prod(shape)), dtype=np.int64)
    voxels = np.argwhere(binary)[:, ::-1] + lo  # source index (x, y, z) of each foreground voxel
    block = max(1, POINT_BLOCK // len(sub))
    for v0 in range(0, len(voxels), block):
        centres = voxels[v0 : v0 + block] @ to_reference.T + shift
        index = np.floor(centres[:, None, :] + sub[None, :, :] + 0.5).astype(np.int64).reshape(-1, 3) - start
        inside = np.all((index >= 0) & (index < stop - start), axis=1)
        index = index[inside]
        counts += np.bincount(np.ravel_multi_index((index[:, 2], index[:, 1], index[:, 0]), shape), minlength=counts.size)
    sub_volume = float(np.prod(source_spacing)) / len(sub)
    fraction = counts.reshape(shape) * (sub_volume / float(np.prod(reference_spacing)))
    return np.minimum(fraction, 1.0).astype(np.float32)


def lesion_fraction_on(
    binary: np.ndarray, lo: np.ndarray, source: sitk.Image, reference: sitk.Image
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Volume fraction of the reference voxels around one lesion covered by it.

    binary: (z, y, x) bool block of ``source`` holding the lesion, its first voxel at source index
    ``lo`` (x, y, z). Returns (start, stop, fraction): the reference index box (x, y, z, stop
    exclusive) around the lesion, clipped to the reference, and the (z, y, x) float32 fraction of
    each of its voxels (0..1) that the lesion covers; None when the box misses the reference. The
    overlap is exact for grids sharing their directions and sampled with sub-voxel points otherwise.
    """
    lo = np.asarray(lo, dtype=np.int64)
    hi = lo + np.asarray(binary.shape[::-1]) - 1
    box = _component_box_on_reference(source, lo, hi, reference)
    if box is None:
        return None
    start, stop = box
    aligned = np.allclose(source.GetDirection(), reference.GetDirection(), rtol=0, atol=ALIGNED_DIRECTION_TOL)
    method = _fraction_separable if aligned else _fraction_sampled
    return start, stop, method(binary, lo, source, reference, start, stop)


def _count_lesions(binary: np.ndarray) -> int:
    import cc3d

    return int(cc3d.connected_components(binary, connectivity=LESION_CONNECTIVITY, return_N=True)[1]) if binary.any() else 0


def _centre_fraction(binary: np.ndarray, lo: np.ndarray, source: sitk.Image, reference: sitk.Image,
                     start: np.ndarray, stop: np.ndarray) -> np.ndarray:  # fmt: skip
    """Lesion ``binary`` interpolated linearly at the centres of the reference voxels ``start:stop``.

    Arguments as :func:`_fraction_separable`; returns (z, y, x) float32. Linear interpolation is
    linear in the image, so the maps of the lesions of one label add up to the label's map.
    """
    import SimpleITK as sitk

    # Zero border: the interpolator clamps at the buffer edge, which would smear the lesion.
    piece = sitk.GetImageFromArray(np.pad(binary.astype(np.float32), 1))
    piece.SetSpacing(source.GetSpacing())
    piece.SetDirection(source.GetDirection())
    piece.SetOrigin(source.TransformContinuousIndexToPhysicalPoint(tuple(float(v) - 1.0 for v in lo)))
    window = sitk.Image([int(v) for v in stop - start], sitk.sitkFloat32)
    window.SetSpacing(reference.GetSpacing())
    window.SetDirection(reference.GetDirection())
    window.SetOrigin(reference.TransformIndexToPhysicalPoint(tuple(int(v) for v in start)))
    return sitk.GetArrayFromImage(sitk.Resample(piece, window, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def resample_mask_to(
    mask: sitk.Image, reference: sitk.Image, log_messages: bool = True
) -> tuple[sitk.Image, MaskResampleReport]:
    """Label map resampled onto ``reference``'s grid, keeping every lesion that can be kept.

    mask: integer label map (0 = background), any grid in the same physical space. Per label, the
    binary mask is interpolated linearly at the reference voxel centres (a fraction map) and
    voxels with fraction >= 0.5 get the label; where several labels pass, the one with the larger
    fraction wins (ties: lower label). A lesion (connected component of one label) that leaves no
    voxel in the result keeps the free reference voxel holding the largest part of its volume
    (:func:`lesion_fraction_on`), which finds it wherever it lies between voxel centres. It is
    lost only when it lies entirely outside the reference grid, or when every reference voxel it
    overlaps already holds another label. Returns a uint8 label map with ``reference``'s geometry
    and the report (lost, rescued and merged lesions are also logged as warnings); identical
    geometries are copied through unchanged. A mask with non-integer values (a probability map) is
    refused with a ``ValueError``: casting it would truncate 0.5 to background. ``log_messages``:
    log the report's messages as warnings (the callers that report per structure turn it off).
    """
    import cc3d
    import SimpleITK as sitk
    from scipy import ndimage

    source_array = sitk.GetArrayFromImage(mask)
    if np.issubdtype(source_array.dtype, np.floating) and source_array.size:
        if not np.all(np.isfinite(source_array)) or not np.all(np.mod(source_array, 1) == 0):
            odd = np.unique(source_array[~np.isfinite(source_array) | (np.mod(source_array, 1) != 0)])
            raise ValueError(
                f"mask values must be integer labels, found {', '.join(f'{v:g}' for v in odd[:5])}"
                + (f" ... ({len(odd)} distinct)" if len(odd) > 5 else "")
                + ": threshold a probability mask first"
            )
    if source_array.size and (source_array.min() < 0 or source_array.max() > 255):
        raise ValueError(f"mask labels must be in 0..255, got {source_array.min()}..{source_array.max()}")
    source_array = source_array.astype(np.uint8)
    labels = [int(v) for v in np.unique(source_array) if v != 0]

    if same_geometry(mask, reference):
        out = sitk.GetImageFromArray(source_array)
        out.CopyInformation(reference)
        n = sum(_count_lesions(source_array == v) for v in labels)
        return out, MaskResampleReport(n, n, 0)

    ref_shape = reference.GetSize()[::-1]
    best_fraction = np.zeros(ref_shape, dtype=np.float32)
    out_array = np.zeros(ref_shape, dtype=np.uint8)
    report = MaskResampleReport(0, 0, 0)
    # label, voxels, reference window (z, y, x slices) or None when outside, volume fraction there
    lesions: list[tuple[int, int, tuple[slice, ...] | None, np.ndarray | None]] = []
    before: dict[int, int] = {}
    label_fraction = np.zeros(ref_shape, dtype=np.float32)
    for value in labels:
        bounds = ndimage.find_objects((source_array == value).view(np.uint8))[0]
        components, n = cc3d.connected_components(
            source_array[bounds] == value, connectivity=LESION_CONNECTIVITY, return_N=True
        )
        before[value] = int(n)
        label_fraction.fill(0.0)
        for component_id, box in enumerate(ndimage.find_objects(components), start=1):
            lesion = components[box] == component_id
            lo = np.array([bounds[2].start + box[2].start, bounds[1].start + box[1].start, bounds[0].start + box[0].start])
            placed = lesion_fraction_on(lesion, lo, mask, reference)
            if placed is None:
                lesions.append((value, int(lesion.sum()), None, None))
                continue
            start, stop, volume_fraction = placed
            window = tuple(slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))
            label_fraction[window] += _centre_fraction(lesion, lo, mask, reference, start, stop)
            lesions.append((value, int(lesion.sum()), window, volume_fraction))
        wins = (label_fraction >= MASK_THRESHOLD) & (label_fraction > best_fraction)
        out_array[wins] = value
        best_fraction[wins] = label_fraction[wins]
    report.lesions_before = sum(before.values())

    lost: dict[int, int] = dict.fromkeys(labels, 0)
    for value, voxels, window, fraction in lesions:
        if window is None or not np.any(fraction > 0):
            lost[value] += 1
            report.messages.append(f"label {value}: a {voxels}-voxel lesion lies outside the reference grid and is lost")
            continue
        here = out_array[window]  # a view: the rescue below writes into out_array
        if np.any((fraction > 0) & (here == value)):
            continue  # present in the result (possibly merged with a neighbour)
        free = np.where(here == 0, fraction, 0.0)  # never overwrite another label
        if free.max() <= 0:
            lost[value] += 1
            report.messages.append(
                f"label {value}: a {voxels}-voxel lesion is lost: every reference voxel it overlaps holds another label"
            )
            continue
        k, j, i = np.unravel_index(int(np.argmax(free)), free.shape)
        here[k, j, i] = value
        report.rescued_lesions += 1
        report.messages.append(
            f"label {value}: a {voxels}-voxel lesion would vanish on the reference grid (it covers at most "
            f"{fraction.max():.2f} of a reference voxel and no voxel centre); kept as the voxel holding most of it"
        )
    report.lost_lesions = sum(lost.values())
    for value in labels:
        after = _count_lesions(out_array == value)
        report.lesions_after += after
        merged = before[value] - lost[value] - after
        if merged > 0:
            report.merged_lesions += merged
            report.messages.append(
                f"label {value}: {before[value]} lesions before, {after} after on the reference grid "
                f"({lost[value]} lost): {merged} merged with a neighbour"
            )
    if log_messages:
        for message in report.messages:
            logger.warning(message)
    out = sitk.GetImageFromArray(out_array)
    out.CopyInformation(reference)
    return out, report


# The CT must cover at least this share of the PET's activity (sum of positive PET values at the
# voxel centres it covers, over the whole PET's): below it the case fails (--allow-partial-ct: a
# warning). Activity-weighted because a CT reconstructed on a 500 mm field of view routinely covers
# only about 40 % of a 700-800 mm PET field of view in-plane, all of it air outside the body; what
# must not be missing is the body. 0.8 lets a CT that stops short of the head or the feet through
# (with the warning below) and refuses one that misses a large part of the body, or all of it.
MIN_CT_COVERAGE = 0.8
# Below this share of the activity (and above MIN_CT_COVERAGE) the case gets a warning.
WARN_CT_COVERAGE = 0.98


def ct_activity_coverage(ct: sitk.Image, pet: sitk.Image) -> float:
    """Share (0..1) of the PET's activity (sum of its positive voxel values) at voxel centres inside
    the CT's field of view (the rule of :func:`ct_coverage_fraction`); the plain voxel share when
    the PET holds no positive value."""
    import SimpleITK as sitk

    ones = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    ones.CopyInformation(ct)
    ones = ones + 1
    covered = sitk.GetArrayFromImage(
        sitk.Resample(ones, pet, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ) > 0
    activity = np.clip(sitk.GetArrayViewFromImage(pet).astype(np.float64), 0.0, None)
    total = float(activity.sum())
    if not np.isfinite(total) or total <= 0:
        return float(covered.mean())
    return float(activity[covered].sum() / total)


def place_on_pet_grid(
    ct: sitk.Image,
    label: sitk.Image,
    pet: sitk.Image,
    case_id: str,
    options: MaskOptions | None = None,
    *,
    structures: Sequence[MaskStructure] | None = None,
    ct_name: str = "the CT",
    label_name: str = "label",
) -> tuple[sitk.Image, sitk.Image, list[str]]:
    """CT and label on the PET grid, with the warnings the metadata table should carry.

    CT: copied through when already on the PET grid (within 0.01 mm of rounding), else resampled
    linearly with -1024 HU outside its field of view. When it covers less than
    :data:`MIN_CT_COVERAGE` of the PET's activity (:func:`ct_activity_coverage`) the case fails with
    a ``ConversionError`` naming ``ct_name`` and the coverage, unless ``options.allow_partial_ct``
    (then a warning, as below :data:`WARN_CT_COVERAGE`). Label: resampled per label as a fraction
    map thresholded at 0.5 (:func:`resample_mask_to`). ``structures``: the selected ROIs / segments
    of the label with their accounting so far (:mod:`~nnunetv2_l1dfl.conversion.masks`); without
    them each label value is one structure. Each is followed onto the PET grid and
    :func:`~nnunetv2_l1dfl.conversion.masks.check_structures` fails the case (``MaskError``, naming
    the file and ROI / segment) when one ends empty or loses a lesion, unless
    ``options.allow_lesion_loss``; rescued and merged lesions are warnings.
    Returns (ct float32, label uint8, warnings).
    """
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.masks import (
        MaskOptions,
        check_structures,
        labels_from_image,
        place_structures,
    )

    options = options or MaskOptions()
    warnings = []
    if geometry_mismatch(ct, pet, atol=1e-2) is None:
        ct_on_pet = snap_to_grid(ct, pet, "CT", case_id)
    else:
        coverage = ct_activity_coverage(ct, pet)
        fov = ct_coverage_fraction(ct, pet)
        message = (
            f"{ct_name} covers {100 * coverage:.1f}% of the PET activity ({100 * fov:.1f}% of the PET field of "
            f"view; filled with -1024 HU outside)"
        )
        if coverage < MIN_CT_COVERAGE and not options.allow_partial_ct:
            raise ConversionError(
                f"case {case_id}: CT not covering PET: {message}; at least {100 * MIN_CT_COVERAGE:.0f}% is required "
                "(--allow-partial-ct converts it anyway with a recorded warning)"
            )
        if coverage < WARN_CT_COVERAGE:
            accepted = " (--allow-partial-ct)" if coverage < MIN_CT_COVERAGE else ""
            warnings.append(f"CT not covering PET{accepted}: {message}")
        ct_on_pet = resample_ct_to(ct, pet)
    if structures is None:
        placed = labels_from_image(label, label_name, options)
        label, structures = placed.label, placed.structures
    if geometry_mismatch(label, pet, atol=1e-2) is None:
        label = snap_to_grid(label, pet, "label", case_id)
    source_grid = label
    label_on_pet, report = resample_mask_to(label, pet, log_messages=False)
    place_structures(structures, source_grid, label_on_pet, "PET")
    if report.rescued_lesions:
        warnings.append(
            f"{report.rescued_lesions} lesion(s) smaller than a PET voxel kept as a single voxel on the PET grid"
        )
    if report.merged_lesions:
        warnings.append(
            f"lesions merged in resampling: {report.lesions_before} lesions before, {report.lesions_after} after "
            f"on the PET grid ({report.merged_lesions} merged with a neighbour, {report.lost_lesions} lost)"
        )
    if report.lost_lesions and not any(s.lost for s in structures):  # the structures name the loss otherwise
        loss = f"{report.lost_lesions} of {report.lesions_before} lesions have no voxel on the PET grid"
        if not options.allow_lesion_loss:
            from nnunetv2_l1dfl.conversion.masks import LOSS_HINT, MaskError

            raise MaskError(f"case {case_id}: lesion lost in resampling: {loss} {LOSS_HINT}")
        warnings.append(f"lesion loss accepted (--allow-lesion-loss): lesion lost in resampling: {loss}")
    warnings.extend(check_structures(structures, options.allow_lesion_loss))
    return ct_on_pet, label_on_pet, list(dict.fromkeys(warnings))
