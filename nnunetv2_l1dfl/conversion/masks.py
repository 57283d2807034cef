"""Lesion masks from RTSTRUCT contours, DICOM SEG and NIfTI, as uint8 label maps on a reference grid.

RTSTRUCT contours are rasterized in physical space: every contour point is mapped into the
reference's continuous voxel index, each CLOSED_PLANAR contour is filled on the reference slice its
plane falls on (voxel centres inside the polygon), and the contours of one ROI on one plane are
combined by XOR (even-odd rule), so inner contours cut holes. ROIs are chosen by a name pattern.
DICOM SEG goes through highdicom (``segread`` / ``get_volume``), which fills frames the SEG
left out as empty; pydicom-seg does not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_l1dfl.conversion.dicom_series import FRAME_OF_REFERENCE_KEY
from nnunetv2_l1dfl.conversion.resample import MaskResampleReport, resample_mask_to, same_geometry

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

DEFAULT_ROI_PATTERN = "lesion"
# A contour plane more than this many slices from the nearest reference slice centre is off-grid.
PLANE_OFFSET_WARN = 0.1


class MaskError(ValueError):
    """A mask that cannot be placed correctly; the message names the file and the attribute."""


def _reference_frame_of_reference(reference: sitk.Image) -> str:
    return reference.GetMetaData(FRAME_OF_REFERENCE_KEY).strip() if reference.HasMetaDataKey(FRAME_OF_REFERENCE_KEY) else ""


def _check_frame_of_reference(path: Path, uid: str, reference: sitk.Image, what: str) -> None:
    expected = _reference_frame_of_reference(reference)
    if not expected:
        logger.warning("%s: reference image carries no FrameOfReferenceUID (metadata 0020|0052); not checked", path)
        return
    if uid and uid != expected:
        raise MaskError(
            f"{path}: {what} FrameOfReferenceUID (0020,0052) {uid} differs from the reference image's {expected}; "
            "the contours belong to another frame of reference (another scan or registration)"
        )


def _read_rtstruct(path: Path) -> pydicom.Dataset:
    import pydicom

    ds = pydicom.dcmread(path)
    if ds.get("Modality") != "RTSTRUCT":
        raise MaskError(f"{path}: Modality (0008,0060) is {ds.get('Modality')!r}, not RTSTRUCT")
    if "StructureSetROISequence" not in ds:
        raise MaskError(f"{path}: no StructureSetROISequence (3006,0020)")
    return ds


def list_rtstruct_rois(rtstruct_path: Path) -> list[str]:
    """ROI names (3006,0026) of an RTSTRUCT, in the order of StructureSetROISequence."""
    ds = _read_rtstruct(Path(rtstruct_path))
    return [str(roi.get("ROIName", "")).strip() for roi in ds.StructureSetROISequence]


def _select_rois(
    path: Path, names: dict[int, str], roi_pattern: str, roi_labels: Mapping[str, int] | None
) -> dict[int, int]:
    """ROI number -> label. The first matching pattern of ``roi_labels`` decides an ROI's label."""
    patterns = dict(roi_labels) if roi_labels is not None else {roi_pattern: 1}
    compiled = []
    for pattern, label in patterns.items():
        if not 1 <= int(label) <= 255:
            raise ValueError(f"roi_labels: label {label} for {pattern!r} must be in 1..255")
        try:
            compiled.append((re.compile(pattern, re.IGNORECASE), int(label)))
        except re.error as e:
            raise ValueError(f"invalid ROI name pattern {pattern!r}: {e}") from None
    chosen = {}
    for number, name in names.items():
        for regex, label in compiled:
            if regex.search(name):
                chosen[number] = label
                break
    if not chosen:
        available = ", ".join(repr(n) for n in names.values()) or "none"
        raise MaskError(
            f"{path}: no ROI name matches {' or '.join(repr(p) for p in patterns)} "
            f"(case-insensitive regex search); ROIs available: {available}"
        )
    for regex, _ in compiled:
        if not any(regex.search(names[n]) for n in chosen):
            logger.warning("%s: ROI pattern %r matches no ROI", path, regex.pattern)
    return chosen


def _fill_polygon(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (rows, cols) image of the voxel centres inside one closed polygon.

    rows, cols: vertex coordinates in continuous voxel index units. Scanline even-odd rule: a
    centre is inside when an odd number of polygon edges cross its row to its left; edges are
    half-open in the row direction so a vertex on a row is counted once.
    """
    out = np.zeros(shape, dtype=bool)
    first_row = max(0, int(np.ceil(rows.min())))
    last_row = min(shape[0] - 1, int(np.floor(rows.max())))
    if first_row > last_row:
        return out
    y0, x0 = rows, cols
    y1, x1 = np.roll(rows, -1), np.roll(cols, -1)
    scan = np.arange(first_row, last_row + 1, dtype=np.float64)[:, None]  # (R, 1) against (N,) edges
    crosses = ((y0 <= scan) & (y1 > scan)) | ((y1 <= scan) & (y0 > scan))
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = np.where(crosses, x0 + (scan - y0) * (x1 - x0) / (y1 - y0), np.inf)
    x_cross.sort(axis=1)
    centres = np.arange(shape[1], dtype=np.float64)
    for i, row in enumerate(range(first_row, last_row + 1)):
        xs = x_cross[i][: int(crosses[i].sum())]
        if xs.size:
            out[row] = np.searchsorted(xs, centres, side="right") % 2 == 1
    return out


def _contour_points(contour: pydicom.Dataset) -> np.ndarray:
    """ContourData (3006,0050) as an (N, 3) float64 array in mm.

    Parsed from the raw text when pydicom has not converted it yet: converting thousands of DS
    values one by one is the slow part of reading a large RTSTRUCT.
    """
    raw = contour.get_item(0x30060050)
    if raw is None:
        return np.zeros((0, 3))
    value = raw.value
    if isinstance(value, bytes):
        text = value.decode("ascii").strip(" \x00")
        numbers = np.array(text.split("\\"), dtype=np.float64) if text else np.zeros(0)
    else:
        numbers = np.atleast_1d(np.asarray(value if value is not None else [], dtype=np.float64))
    if numbers.size % 3:
        raise MaskError(f"ContourData (3006,0050) holds {numbers.size} numbers, not a multiple of 3")
    return numbers.reshape(-1, 3)


def rasterize_rtstruct(
    rtstruct_path: Path,
    reference: sitk.Image,
    roi_pattern: str = DEFAULT_ROI_PATTERN,
    roi_labels: Mapping[str, int] | None = None,
) -> tuple[sitk.Image, list[str]]:
    """Rasterize the selected RTSTRUCT ROIs onto ``reference``'s grid.

    Selection: ROIs whose name contains a match of the regex ``roi_pattern`` (case-insensitive;
    default: names containing "lesion"), all merged into label 1; or ``roi_labels`` {regex: label},
    where an ROI takes the label of the first pattern it matches (unmatched ROIs are ignored, and
    where ROIs of different labels overlap the first-listed pattern's label wins).
    Contours: CLOSED_PLANAR only (POINT / OPEN_PLANAR are skipped with a warning); each plane is
    assigned to the nearest reference slice (the closest plane wins when several map to one slice;
    planes more than half a slice outside the grid are dropped, with a warning), voxel centres inside
    a contour are set, and the contours of one ROI on one plane combine by XOR, so holes stay holes.
    For exact results rasterize on the series the contours were drawn on and resample afterwards.
    The RTSTRUCT's FrameOfReferenceUID must equal the reference's (metadata ``0020|0052``; the
    error names both). Raises ``MaskError`` listing the available ROI names when none matches.
    Returns the uint8 label map (reference geometry) and the names of the ROIs used.
    """
    import SimpleITK as sitk

    path = Path(rtstruct_path)
    ds = _read_rtstruct(path)
    names = {int(roi.ROINumber): str(roi.get("ROIName", "")).strip() for roi in ds.StructureSetROISequence}
    roi_frames = {
        int(roi.ROINumber): str(roi.get("ReferencedFrameOfReferenceUID", "")).strip() for roi in ds.StructureSetROISequence
    }
    chosen = _select_rois(path, names, roi_pattern, roi_labels)
    for number in chosen:
        uid = roi_frames.get(number) or str(ds.get("FrameOfReferenceUID", "")).strip()
        _check_frame_of_reference(path, uid, reference, f"ROI {names[number]!r}")

    size = reference.GetSize()  # x, y, z
    out = np.zeros(size[::-1], dtype=np.uint8)  # z, y, x
    # physical point p -> continuous index: inverse(direction @ diag(spacing)) @ (p - origin)
    direction = np.asarray(reference.GetDirection(), float).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(reference.GetSpacing()))
    origin = np.asarray(reference.GetOrigin(), float)
    contours_by_roi = {int(item.ReferencedROINumber): item.get("ContourSequence", []) for item in ds.ROIContourSequence}
    # Paint in reverse priority so that the first-listed pattern's label ends up on top.
    label_order = list(dict.fromkeys((roi_labels or {roi_pattern: 1}).values()))
    used = []
    overlap = 0
    for number in sorted(chosen, key=lambda n: label_order.index(chosen[n]), reverse=True):
        label = chosen[number]
        planes: dict[float, list[np.ndarray]] = {}
        skipped_types = set()
        for contour in contours_by_roi.get(number, []):
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).strip()
            if kind != "CLOSED_PLANAR":
                skipped_types.add(kind)
                continue
            points = _contour_points(contour)
            if len(points) < 3:
                continue
            index = (points - origin) @ to_index.T  # columns: x (column), y (row), z (slice)
            k = float(np.median(index[:, 2]))
            if np.abs(index[:, 2] - k).max() > 0.05:
                raise MaskError(
                    f"{path}: a contour of ROI {names[number]!r} is not parallel to the reference slices "
                    f"(slice index varies by {np.ptp(index[:, 2]):.2f} along it); ContourData (3006,0050)"
                )
            planes.setdefault(round(k, 3), []).append(index)
        if skipped_types:
            logger.warning("%s: ROI %r: contours of type %s skipped", path, names[number], sorted(skipped_types))
        if not planes:
            logger.warning("%s: ROI %r has no closed contours", path, names[number])
        roi_mask = np.zeros_like(out, dtype=bool)
        nearest: dict[int, float] = {}
        for k in planes:
            slice_index = int(np.floor(k + 0.5))
            if not 0 <= slice_index < size[2]:
                logger.warning("%s: ROI %r: contour plane at slice %.2f is outside the reference", path, names[number], k)
                continue
            if slice_index not in nearest or abs(k - slice_index) < abs(nearest[slice_index] - slice_index):
                nearest[slice_index] = k
        off_grid = max((abs(k - s) for s, k in nearest.items()), default=0.0)
        if off_grid > PLANE_OFFSET_WARN:
            logger.warning(
                "%s: ROI %r: contour planes lie up to %.2f slices off the reference slice centres; "
                "rasterize on the contoured series and resample for exact results", path, names[number], off_grid,
            )  # fmt: skip
        for slice_index, k in nearest.items():
            for index in planes[k]:
                roi_mask[slice_index] ^= _fill_polygon(index[:, 1], index[:, 0], (size[1], size[0]))
        overlap += int(np.count_nonzero(roi_mask & (out != 0) & (out != label)))
        out[roi_mask] = label
        used.append(names[number])
    if overlap:
        logger.warning("%s: %d voxels claimed by ROIs of different labels", path, overlap)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image, sorted(used, key=lambda n: list(names.values()).index(n))


def _log_resample_report(path: Path, what: str, report: MaskResampleReport) -> None:
    """One line of lesion bookkeeping per resampled mask: a warning when a lesion was lost, rescued
    as a single voxel or merged with a neighbour (the count after is then lower), else info."""
    changed = report.lost_lesions or report.rescued_lesions or report.merged_lesions
    logger.log(
        logging.WARNING if changed else logging.INFO,
        "%s: %s resampled onto the reference: %d lesions before, %d after, %d rescued, %d lost, %d merged",
        path, what, report.lesions_before, report.lesions_after, report.rescued_lesions, report.lost_lesions,
        report.merged_lesions,
    )  # fmt: skip


def read_dicom_seg(seg_path: Path, reference: sitk.Image, segment_pattern: str | None = None,
                   keep_segment_numbers: bool = False) -> sitk.Image:  # fmt: skip
    """Read a DICOM SEG (highdicom) as a uint8 label map on ``reference``'s grid.

    segment_pattern: regex searched (case-insensitively) in each SegmentLabel (0062,0005); ``None``
    takes every segment. The chosen segments are merged into label 1, or, with
    ``keep_segment_numbers``, keep their SegmentNumber (0062,0004) as label (lower number wins on
    overlap). Frames the SEG omitted are filled as empty by highdicom; fractional segments are
    thresholded at 0.5. When the SEG's grid differs from the reference it is resampled onto it with
    ``resample_mask_to`` (lesion bookkeeping logged). Raises ``MaskError`` on a FrameOfReferenceUID
    mismatch or when no segment matches (listing the available labels).
    """
    import highdicom as hd
    import SimpleITK as sitk

    path = Path(seg_path)
    try:
        seg = hd.seg.segread(path)
    except Exception as e:
        raise MaskError(f"{path}: not readable as DICOM SEG: {e}") from e
    _check_frame_of_reference(path, str(seg.get("FrameOfReferenceUID", "")).strip(), reference, "SEG")
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")).strip() for s in seg.SegmentSequence}
    if segment_pattern is not None:
        regex = re.compile(segment_pattern, re.IGNORECASE)
        chosen = [n for n, label in segments.items() if regex.search(label)]
    else:
        chosen = list(segments)
    if not chosen:
        available = ", ".join(f"{n}: {label!r}" for n, label in segments.items()) or "none"
        raise MaskError(f"{path}: no SegmentLabel (0062,0005) matches {segment_pattern!r}; segments: {available}")
    try:
        volume = seg.get_volume(segment_numbers=chosen, combine_segments=False)
    except Exception as e:
        raise MaskError(f"{path}: the SEG frames do not form one regular volume: {e}") from e
    array = np.asarray(volume.array)  # (slices, rows, columns, segments) in the SEG's own geometry
    if array.ndim == 3:
        array = array[..., None]
    binary = array >= 0.5 if np.issubdtype(array.dtype, np.floating) else array > 0
    labels = np.zeros(binary.shape[:3], dtype=np.uint8)
    for channel in reversed(range(binary.shape[3])):  # lower segment number painted last = wins
        labels[binary[..., channel]] = chosen[channel] if keep_segment_numbers else 1

    affine = np.asarray(volume.affine, dtype=np.float64)  # array index (i, j, k) -> patient mm
    axes = affine[:3, [2, 1, 0]]  # SimpleITK x, y, z = array axes 2, 1, 0
    spacing = np.linalg.norm(axes, axis=0)
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (axes / spacing).ravel()))
    if same_geometry(image, reference):
        image.CopyInformation(reference)
        return image
    resampled, report = resample_mask_to(image, reference)
    _log_resample_report(path, "SEG", report)
    return resampled


def read_nifti_mask(path: Path, reference: sitk.Image) -> sitk.Image:
    """Read a NIfTI (or any SimpleITK-readable) label map as uint8 on ``reference``'s grid.

    Values must be integers in 0..255 (a float mask holding 0.0/1.0 is fine). A mask on the
    reference grid (within 1e-3 mm) gets the reference's exact geometry; any other grid is
    resampled with ``resample_mask_to`` (lesion bookkeeping logged).
    """
    import SimpleITK as sitk

    path = Path(path)
    mask = sitk.ReadImage(str(path))
    if mask.GetNumberOfComponentsPerPixel() != 1 or mask.GetDimension() != 3:
        raise MaskError(f"{path}: expected a 3D single-channel label map, got {mask.GetDimension()}D "
                        f"with {mask.GetNumberOfComponentsPerPixel()} components")  # fmt: skip
    array = sitk.GetArrayViewFromImage(mask)
    if array.size and (not np.all(np.equal(np.mod(array, 1), 0)) or array.min() < 0 or array.max() > 255):
        raise MaskError(f"{path}: label values must be integers in 0..255 (found {array.min()}..{array.max()})")
    labels = sitk.Cast(mask, sitk.sitkUInt8)
    if same_geometry(labels, reference):
        labels.CopyInformation(reference)
        return labels
    resampled, report = resample_mask_to(labels, reference)
    _log_resample_report(path, "mask", report)
    return resampled
