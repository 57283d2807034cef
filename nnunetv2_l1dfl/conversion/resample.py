"""Resampling onto the PET grid: CT with linear interpolation, label maps without losing lesions.

CT outside its field of view becomes -1024 HU (air), and ``ct_coverage_fraction`` says how much of
the PET grid the CT covers. Label maps are resampled per label as a linearly interpolated fraction
map thresholded at 0.5 (a smoother, partial-volume-aware nearest neighbour); a lesion (3D connected
component, 18-connectivity) that would vanish on the coarser grid keeps its highest-fraction voxel,
and the report says how many lesions there were before and after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

CT_OUTSIDE_HU = -1024.0
MASK_THRESHOLD = 0.5
LESION_CONNECTIVITY = 18


@dataclass
class MaskResampleReport:
    """Lesion bookkeeping of one ``resample_mask_to`` call, summed over labels.

    lesions_before / lesions_after: 3D connected components (18-connectivity) per label in the input
    and in the output (lesions that merge on the coarser grid count once after). rescued_lesions:
    lesions that would have vanished and were kept as their highest-fraction voxel. lost_lesions:
    lesions with no voxel at all in the output (they lie outside the reference grid).
    """

    lesions_before: int
    lesions_after: int
    lost_lesions: int
    rescued_lesions: int = 0
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


def resample_mask_to(mask: sitk.Image, reference: sitk.Image) -> tuple[sitk.Image, MaskResampleReport]:
    """Label map resampled onto ``reference``'s grid, keeping every lesion that can be kept.

    mask: integer label map (0 = background), any grid in the same physical space. Per label, the
    binary mask is interpolated linearly (a fraction map) and voxels with fraction >= 0.5 get the
    label; where several labels pass, the one with the larger fraction wins (ties: lower label).
    A lesion (connected component of one label) that leaves no voxel in the result keeps its
    highest-fraction voxel, unless it lies entirely outside the reference (then it is lost).
    Returns a uint8 label map with ``reference``'s geometry and the report; identical geometries
    are copied through unchanged.
    """
    import cc3d
    import SimpleITK as sitk
    from scipy import ndimage

    source_array = sitk.GetArrayFromImage(mask)
    if source_array.size and (source_array.min() < 0 or source_array.max() > 255):
        raise ValueError(f"mask labels must be in 0..255, got {source_array.min()}..{source_array.max()}")
    source_array = source_array.astype(np.uint8)
    labels = [int(v) for v in np.unique(source_array) if v != 0]

    if same_geometry(mask, reference):
        out = sitk.GetImageFromArray(source_array)
        out.CopyInformation(reference)
        n = sum(int(cc3d.connected_components(source_array == v, connectivity=LESION_CONNECTIVITY, return_N=True)[1]) for v in labels)
        return out, MaskResampleReport(n, n, 0)

    ref_size = reference.GetSize()
    best_fraction = np.zeros(ref_size[::-1], dtype=np.float32)
    out_array = np.zeros(ref_size[::-1], dtype=np.uint8)
    components_by_label = {}
    lesions_before = 0
    for value in labels:
        binary = source_array == value
        binary_image = sitk.GetImageFromArray(binary.astype(np.float32))
        binary_image.CopyInformation(mask)
        fraction = sitk.GetArrayFromImage(
            sitk.Resample(binary_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        )
        wins = (fraction >= MASK_THRESHOLD) & (fraction > best_fraction)
        out_array[wins] = value
        best_fraction[wins] = fraction[wins]
        components, n = cc3d.connected_components(binary, connectivity=LESION_CONNECTIVITY, return_N=True)
        components_by_label[value] = components
        lesions_before += int(n)

    report = MaskResampleReport(lesions_before, 0, 0)
    for value, components in components_by_label.items():
        for component_id, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            lo = np.array([box[2].start, box[1].start, box[0].start])  # x, y, z
            hi = np.array([box[2].stop - 1, box[1].stop - 1, box[0].stop - 1])
            target = _component_box_on_reference(mask, lo, hi, reference)
            if target is None:
                report.lost_lesions += 1
                report.messages.append(f"label {value}: a lesion lies outside the reference grid and is lost")
                continue
            start, stop = target
            # Zero border: the interpolator clamps at the buffer edge, which would smear the lesion.
            piece = sitk.GetImageFromArray(np.pad((components[box] == component_id).astype(np.float32), 1))
            piece.SetSpacing(mask.GetSpacing())
            piece.SetDirection(mask.GetDirection())
            piece.SetOrigin(mask.TransformContinuousIndexToPhysicalPoint(tuple(float(v) - 1.0 for v in lo)))
            window = sitk.Image([int(v) for v in stop - start], sitk.sitkFloat32)
            window.SetSpacing(reference.GetSpacing())
            window.SetDirection(reference.GetDirection())
            window.SetOrigin(reference.TransformIndexToPhysicalPoint(tuple(int(v) for v in start)))
            fraction = sitk.GetArrayFromImage(
                sitk.Resample(piece, window, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            )
            zs, ys, xs = (slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))
            if np.any((fraction > 0) & (out_array[zs, ys, xs] == value)):
                continue  # present in the result (possibly merged with a neighbour)
            free = np.where(out_array[zs, ys, xs] == 0, fraction, 0.0)  # never overwrite another label
            if free.max() <= 0:
                report.lost_lesions += 1
                report.messages.append(
                    f"label {value}: a lesion has no free voxel overlapping it on the reference grid and is lost"
                )
                continue
            k, j, i = np.unravel_index(int(np.argmax(free)), free.shape)
            out_array[zs, ys, xs][k, j, i] = value
            report.rescued_lesions += 1
            voxels = int((components[box] == component_id).sum())
            report.messages.append(
                f"label {value}: a {voxels}-voxel lesion would vanish on the reference grid (max fraction "
                f"{fraction.max():.2f} < {MASK_THRESHOLD}); kept as its highest-fraction voxel"
            )
    report.lesions_after = sum(
        int(cc3d.connected_components(out_array == v, connectivity=LESION_CONNECTIVITY, return_N=True)[1]) for v in labels
    )
    for message in report.messages:
        logger.warning(message)
    out = sitk.GetImageFromArray(out_array)
    out.CopyInformation(reference)
    return out, report
