"""Lesion masks from RTSTRUCT contours, DICOM SEG and NIfTI, as uint8 label maps on a reference grid,
with the voxels and lesions of every selected ROI / segment / label value counted at each stage.

RTSTRUCT contours are rasterized in physical space: every contour point is mapped into the
reference's continuous voxel index, each CLOSED_PLANAR contour is filled on the reference slice its
plane falls on (voxel centres inside the polygon), and the contours of one ROI on one plane are
combined by XOR (even-odd rule), so inner contours cut holes. ROIs are chosen by a name pattern.
DICOM SEG goes through highdicom (``segread`` / ``get_volume``), which fills frames the SEG left out
as empty; pydicom-seg does not. All three SEG types are read: BINARY, FRACTIONAL (a voxel belongs
to a segment when its value is at least 0.5 of MaximumFractionalValue (0062,000E)) and LABELMAP
(segment 0 is the background and never selected).

Lesion accounting (docs/masks.md): each selected ROI, segment or label value is a
:class:`MaskStructure` whose voxels, volume and lesions (18-connected components) are counted as
drawn (contours on an extended grid that holds all of them; SEG frames or a NIfTI mask on their own
grid), on the reference the mask is read onto, and on the PET grid. A structure that ends empty, or
a lesion with no voxel left at a stage, is a loss: :func:`check_structures` raises
:class:`MaskError` naming the file and the ROI / segment unless ``allow_lesion_loss``, which turns
it into a recorded warning. Unusable contours (OPEN_PLANAR, POINT, fewer than 3 points, empty) are
losses too, reported once per ROI with their count.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnunetv2_l1dfl.conversion.dicom_series import FRAME_OF_REFERENCE_KEY
from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.redact import register_identifier
from nnunetv2_l1dfl.conversion.resample import LESION_CONNECTIVITY, resample_mask_to, same_geometry

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

DEFAULT_ROI_PATTERN = "lesion"
# A contour plane more than this many slices from the nearest reference slice centre is off-grid.
PLANE_OFFSET_WARN = 0.1
# A fractional SEG voxel belongs to its segment at >= this fraction of MaximumFractionalValue.
FRACTIONAL_THRESHOLD = 0.5
# The extended grid an ROI's contours are rasterized on (to count what lies outside the reference)
# is clipped to the reference beyond this many voxels; contours outside it then count as lost.
MAX_EXTENDED_VOXELS = 64_000_000
BACKGROUND_LABEL = re.compile(r"^\s*background\s*$", re.IGNORECASE)
LOSS_HINT = "(--allow-lesion-loss converts the case anyway and records this as a warning)"


class MaskError(ConversionError, ValueError):
    """A mask that cannot be placed correctly; the message names the file and the ROI / segment / attribute."""


@dataclass(frozen=True)
class MaskOptions:
    """How a converter selects, reads and places lesion masks; every converter's job payload carries one.

    roi_pattern: regex searched case-insensitively in RTSTRUCT ROI names (matches merged into label 1).
    roi_labels: {regex: label} instead, for RTSTRUCT ROIs and SEG SegmentLabels (first match wins).
    seg_pattern: regex for the SEG segments to use (``None``: every segment except the background).
    mask_threshold: binarize a NIfTI mask with non-integer values at ``value >= mask_threshold``
        (``None``: such a mask is refused).
    allow_lesion_loss: convert a case whose selected ROI / segment ends empty or loses a lesion, with
        the loss recorded as a warning (default: the case fails).
    allow_partial_ct: convert a case whose CT covers less than ``MIN_CT_COVERAGE`` of the PET, with a
        recorded warning (default: the case fails; the CT and the labels are placed together).
    """

    roi_pattern: str = DEFAULT_ROI_PATTERN
    roi_labels: Mapping[str, int] | None = None
    seg_pattern: str | None = None
    mask_threshold: float | None = None
    allow_lesion_loss: bool = False
    allow_partial_ct: bool = False

    def __post_init__(self) -> None:
        if self.mask_threshold is not None and not (np.isfinite(self.mask_threshold) and self.mask_threshold > 0):
            raise MaskError(f"--mask-threshold must be a positive number, got {self.mask_threshold}")

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> MaskOptions:
        """The options of an argparse namespace (missing attributes keep their defaults)."""
        values = {
            name: getattr(args, name)
            for name in ("roi_pattern", "seg_pattern", "mask_threshold", "allow_lesion_loss", "allow_partial_ct")
            if getattr(args, name, None) is not None
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class Stage:
    """Voxels, volume (ml) and lesions (18-connected components) of one structure on one grid."""

    name: str
    voxels: int
    ml: float
    lesions: int


@dataclass
class MaskStructure:
    """One selected ROI, segment or label value and what became of it at each stage.

    kind: ``ROI``, ``segment`` or ``label``. label: the value it gets in the output label map.
    stages: in order (``drawn``, then each grid it was placed on). notes: recorded compromises
    (warnings). lost: lesion losses (fail the case unless ``allow_lesion_loss``). footprint: the
    structure's voxels on the grid of its last stage (a cropped uint8 image), None when empty.
    """

    file: str
    kind: str
    name: str
    label: int
    stages: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    footprint: sitk.Image | None = field(default=None, repr=False)
    footprint_index: tuple[int, int, int] = (0, 0, 0)

    @property
    def title(self) -> str:
        return f"{self.file}: {self.kind} {self.name!r}"

    def problems(self) -> list[str]:
        """The losses of this structure, ending empty included."""
        problems = list(self.lost)
        if self.stages and self.stages[-1].voxels == 0 and not any("empty" in p for p in problems):
            where = self.stages[-1].name
            was = next((s for s in self.stages if s.voxels), None)
            problems.append(
                f"ends empty on the {where} grid" + (f" ({was.voxels} voxels {was.name})" if was else " (no voxels at any stage)")
            )
        return problems


@dataclass
class MaskResult:
    """A label map on a reference grid and the accounting of the structures it holds."""

    label: sitk.Image
    structures: list[MaskStructure]


# ----------------------------------------------------------------------------------------------
# Counting and moving structures between grids
# ----------------------------------------------------------------------------------------------


def _count_lesions(binary: np.ndarray) -> int:
    import cc3d

    if not binary.any():
        return 0
    return int(cc3d.connected_components(binary, connectivity=LESION_CONNECTIVITY, return_N=True)[1])


def _record(structure: MaskStructure, stage: str, binary: np.ndarray, grid: sitk.Image,
            offset: Sequence[int] = (0, 0, 0), footprint: np.ndarray | None = None) -> None:  # fmt: skip
    """Count ``binary`` (z, y, x, on ``grid`` from index ``offset`` x, y, z) as ``stage`` and keep it
    (or ``footprint``, the part that goes on to the next stage) as the structure's footprint."""
    import SimpleITK as sitk

    voxels = int(np.count_nonzero(binary))
    ml = voxels * float(np.prod(grid.GetSpacing())) / 1000.0
    structure.stages.append(Stage(stage, voxels, ml, _count_lesions(binary)))
    binary = binary if footprint is None else footprint
    if not binary.any():
        structure.footprint = None
        return
    nz = np.nonzero(binary)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    crop = binary[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.uint8)
    index = (lo[2] + int(offset[0]), lo[1] + int(offset[1]), lo[0] + int(offset[2]))
    image = sitk.GetImageFromArray(crop)
    image.SetSpacing(grid.GetSpacing())
    image.SetDirection(grid.GetDirection())
    image.SetOrigin(grid.TransformIndexToPhysicalPoint(index))
    structure.footprint = image
    structure.footprint_index = index


def _paste(structure: MaskStructure, shape: tuple[int, int, int]) -> np.ndarray:
    """The footprint on the full (z, y, x) grid of its stage."""
    import SimpleITK as sitk

    out = np.zeros(shape, dtype=bool)
    if structure.footprint is None:
        return out
    crop = sitk.GetArrayViewFromImage(structure.footprint) > 0
    x, y, z = structure.footprint_index
    out[z : z + crop.shape[0], y : y + crop.shape[1], x : x + crop.shape[2]] = crop
    return out


def _components_missing(before: np.ndarray, after: np.ndarray) -> int:
    """Lesions (components of ``before``) of which no voxel is in ``after``."""
    import cc3d

    if not before.any():
        return 0
    components, n = cc3d.connected_components(before, connectivity=LESION_CONNECTIVITY, return_N=True)
    kept = np.unique(components[after & before])
    return int(n - np.count_nonzero(kept))


def place_structures(structures: Sequence[MaskStructure], source_grid: sitk.Image, label: sitk.Image,
                     stage: str) -> None:  # fmt: skip
    """Follow each structure from ``source_grid`` (its last stage) onto ``label``'s grid.

    label: the label map on the new grid (the authoritative output). Each structure's own voxels
    are resampled alone (``resample_mask_to``, which keeps a lesion smaller than a voxel as one
    voxel) and intersected with the voxels of its label in ``label``; lesions that lie outside the
    new grid, or whose every voxel went to another label, are recorded as lost.
    """
    import SimpleITK as sitk

    label_array = sitk.GetArrayViewFromImage(label)
    shape = label_array.shape
    same = same_geometry(source_grid, label)
    for structure in structures:
        if not structure.stages:
            continue
        if structure.footprint is None:
            structure.stages.append(Stage(stage, 0, 0.0, 0))
            continue
        if same:
            own = _paste(structure, shape)
        else:
            resampled, report = resample_mask_to(structure.footprint, label, log_messages=False)
            own = sitk.GetArrayViewFromImage(resampled) > 0
            if report.lost_lesions:
                structure.lost.append(
                    f"{report.lost_lesions} of {report.lesions_before} lesion(s) lie outside the {stage} grid "
                    "and have no voxel there"
                )
            if report.rescued_lesions:
                structure.notes.append(
                    f"{report.rescued_lesions} lesion(s) smaller than a {stage} voxel kept as a single voxel"
                )
        binary = own & (label_array == structure.label)
        overwritten = _components_missing(own, binary)
        if overwritten:
            structure.lost.append(
                f"{overwritten} lesion(s) on the {stage} grid lie entirely under another label (overlapping "
                "ROIs / segments of different labels: the first-listed pattern or lower segment number wins)"
            )
        _record(structure, stage, binary, label)


def check_structures(structures: Sequence[MaskStructure], allow_lesion_loss: bool = False) -> list[str]:
    """The warnings to record for ``structures``; raises :class:`MaskError` on a loss unless allowed.

    A loss: a structure that ends empty, a lesion with no voxel left at some stage, unusable
    contours, a contour item without its ROI. The error names the file and the ROI / segment.
    """
    warnings = []
    losses = []
    for structure in structures:
        for problem in structure.problems():
            losses.append(f"{structure.title}: {problem}")
        for note in structure.notes:
            warnings.append(f"{structure.title}: {note}")
    if losses and not allow_lesion_loss:
        raise MaskError(f"lesion loss: {'; '.join(losses)} {LOSS_HINT}")
    warnings.extend(f"lesion loss accepted (--allow-lesion-loss): {loss}" for loss in losses)
    return warnings


def _log_structures(structures: Sequence[MaskStructure]) -> None:
    """One warning line per structure with notes or losses (never one per contour or plane)."""
    for structure in structures:
        if structure.notes or structure.lost:
            logger.warning("%s: %s", structure.title, "; ".join(structure.lost + structure.notes))


def structure_table(structures: Sequence[MaskStructure]) -> list[str]:
    """Human-readable lines: per structure its stages (voxels, ml, lesions), notes and losses."""
    lines = []
    for s in structures:
        stages = "; ".join(f"{st.name}: {st.voxels} voxels, {st.ml:.3f} ml, {st.lesions} lesion(s)" for st in s.stages)
        lines.append(f"{s.kind} {s.name!r} -> label {s.label}: {stages or 'not placed'}")
        lines.extend(f"  note: {n}" for n in s.notes)
        lines.extend(f"  LOST: {p}" for p in s.problems())
    return lines


# ----------------------------------------------------------------------------------------------
# RTSTRUCT
# ----------------------------------------------------------------------------------------------


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
    from nnunetv2_l1dfl.conversion.dicom_series import DicomSeriesError, read_dicom

    try:
        ds = read_dicom(path)
    except DicomSeriesError as e:
        raise MaskError(str(e)) from e
    if ds.get("Modality") != "RTSTRUCT":
        raise MaskError(f"{path}: Modality (0008,0060) is {ds.get('Modality')!r}, not RTSTRUCT")
    if "StructureSetROISequence" not in ds:
        raise MaskError(f"{path}: no StructureSetROISequence (3006,0020)")
    return ds


def list_rtstruct_rois(rtstruct_path: Path) -> list[str]:
    """ROI names (3006,0026) of an RTSTRUCT, in the order of StructureSetROISequence."""
    ds = _read_rtstruct(Path(rtstruct_path))
    return [str(roi.get("ROIName", "")).strip() for roi in ds.StructureSetROISequence]


def _compile_patterns(patterns: Mapping[str, int]) -> list[tuple[re.Pattern, int]]:
    compiled = []
    for pattern, label in patterns.items():
        if not 1 <= int(label) <= 255:
            raise ValueError(f"roi_labels: label {label} for {pattern!r} must be in 1..255")
        try:
            compiled.append((re.compile(pattern, re.IGNORECASE), int(label)))
        except re.error as e:
            raise ValueError(f"invalid name pattern {pattern!r}: {e}") from None
    return compiled


def _select_rois(
    path: Path, names: dict[int, str], roi_pattern: str, roi_labels: Mapping[str, int] | None
) -> dict[int, int]:
    """ROI number -> label. The first matching pattern of ``roi_labels`` decides an ROI's label."""
    patterns = dict(roi_labels) if roi_labels is not None else {roi_pattern: 1}
    compiled = _compile_patterns(patterns)
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


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _rasterize_roi(path: Path, structure: MaskStructure, contours: Sequence[pydicom.Dataset],
                   reference: sitk.Image) -> tuple[tuple[slice, ...] | None, np.ndarray]:  # fmt: skip
    """One ROI's voxels on the reference as (window of the reference (z, y, x slices) or None, the
    bool voxels in it); records the ``drawn`` stage and the losses.

    The contours are rasterized on the reference lattice extended to hold all of them (clipped to
    the reference beyond :data:`MAX_EXTENDED_VOXELS`), so that what lies outside the reference is
    counted rather than silently dropped.
    """
    size = np.asarray(reference.GetSize())  # x, y, z
    direction = np.asarray(reference.GetDirection(), float).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(reference.GetSpacing()))
    origin = np.asarray(reference.GetOrigin(), float)
    unusable: Counter[str] = Counter()
    planes: dict[float, list[np.ndarray]] = {}
    for contour in contours:
        kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).strip() or "CLOSED_PLANAR"
        try:
            points = _contour_points(contour)
        except MaskError as e:
            raise MaskError(f"{structure.title}: {e}") from None
        if kind != "CLOSED_PLANAR":
            unusable[f"{kind} (only CLOSED_PLANAR contours enclose a volume)"] += 1
            continue
        if len(points) == 0:
            unusable["empty (no ContourData (3006,0050))"] += 1
            continue
        if len(points) < 3:
            unusable[f"with {len(points)} point(s) (a closed contour needs 3)"] += 1
            continue
        index = (points - origin) @ to_index.T  # columns: x (column), y (row), z (slice)
        k = float(np.median(index[:, 2]))
        if np.abs(index[:, 2] - k).max() > 0.05:
            raise MaskError(
                f"{structure.title}: a contour is not parallel to the reference slices "
                f"(slice index varies by {np.ptp(index[:, 2]):.2f} along it); ContourData (3006,0050)"
            )
        planes.setdefault(round(k, 3), []).append(index)
    for what, n in sorted(unusable.items()):
        structure.lost.append(f"{_plural(n, 'contour')} {what} cannot be rasterized")

    # Nearest plane per (extended) slice; a slice's centre within half a slice of a plane.
    nearest: dict[int, float] = {}
    for k in planes:
        slice_index = int(np.floor(k + 0.5))
        if slice_index not in nearest or abs(k - slice_index) < abs(nearest[slice_index] - slice_index):
            nearest[slice_index] = k
    unused = sum(len(planes[k]) for k in planes if k not in nearest.values())
    if unused:
        structure.notes.append(
            f"{_plural(unused, 'contour')} on planes that share a reference slice with a closer plane not used"
        )
    off_grid = max((abs(k - s) for s, k in nearest.items()), default=0.0)
    if off_grid > PLANE_OFFSET_WARN:
        structure.notes.append(
            f"contour planes lie up to {off_grid:.2f} slices off the reference slice centres (each goes to the "
            "nearest slice); rasterize on the contoured series for exact results"
        )
    if not nearest:
        structure.stages.append(Stage("drawn", 0, 0.0, 0))
        if not unusable:
            structure.lost.append("no contours (empty ContourSequence (3006,0040))")
        return None, np.zeros((0, 0, 0), dtype=bool)

    points_all = np.concatenate([index for k in nearest.values() for index in planes[k]])
    lo = np.array([np.floor(points_all[:, 0].min()), np.floor(points_all[:, 1].min()), min(nearest)], dtype=np.int64)
    hi = np.array([np.ceil(points_all[:, 0].max()), np.ceil(points_all[:, 1].max()), max(nearest)], dtype=np.int64) + 1
    if np.prod((hi - lo).astype(float)) > MAX_EXTENDED_VOXELS:
        lo, hi = np.maximum(lo, 0), np.maximum(np.minimum(hi, size), np.maximum(lo, 0))
        structure.notes.append("contours reach far outside the reference: counted on the reference only")
    box_shape = tuple(int(v) for v in (hi - lo)[::-1])  # z, y, x
    box = np.zeros(box_shape, dtype=bool)
    empty_contours: list[tuple[int, np.ndarray]] = []
    for slice_index, k in nearest.items():
        z = slice_index - lo[2]
        if not 0 <= z < box_shape[0]:
            empty_contours.extend((slice_index, index) for index in planes[k])
            continue
        for index in planes[k]:
            filled = _fill_polygon(index[:, 1] - lo[1], index[:, 0] - lo[0], box_shape[1:])
            if not filled.any():
                empty_contours.append((slice_index, index))
            box[z] ^= filled
    # A contour that encloses no voxel centre and touches no voxel of the ROI is a lesion lost.
    vanished = 0
    for slice_index, index in empty_contours:
        z = slice_index - lo[2]
        r0, r1 = int(np.floor(index[:, 1].min())) - lo[1] - 1, int(np.ceil(index[:, 1].max())) - lo[1] + 2
        c0, c1 = int(np.floor(index[:, 0].min())) - lo[0] - 1, int(np.ceil(index[:, 0].max())) - lo[0] + 2
        near = box[max(z - 1, 0) : max(z + 2, 0), max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)]
        if not near.any():
            vanished += 1
    if vanished:
        structure.lost.append(
            f"{_plural(vanished, 'contour')} enclose no voxel centre of the reference grid (smaller than a voxel "
            "or outside it) and touch no other voxel of the ROI"
        )
    _record(structure, "drawn", box, reference, offset=lo)

    # Crop the extended raster to the reference (kept as a window: one full-size array per ROI would
    # not fit in memory for an RTSTRUCT with many ROIs on a large CT).
    start, stop = np.maximum(lo, 0), np.minimum(hi, size)
    if not np.all(stop > start):
        window, crop = None, np.zeros((0, 0, 0), dtype=bool)
    else:
        window = tuple(slice(int(start[d]), int(stop[d])) for d in (2, 1, 0))
        inside = tuple(slice(int(start[d] - lo[d]), int(stop[d] - lo[d])) for d in (2, 1, 0))
        crop = box[inside]
    outside = int(box.sum() - crop.sum())
    if outside:
        kept = np.zeros_like(box)
        if window is not None:
            kept[inside] = crop
        missing = _components_missing(box, kept)
        if missing:
            structure.lost.append(
                f"{_plural(missing, 'lesion')} drawn entirely outside the reference image (in-plane or in z)"
            )
        structure.notes.append(
            f"{outside} of {int(box.sum())} voxels ({100 * outside / box.sum():.1f}%) drawn outside the reference "
            "image are cut off"
        )
    return window, crop


def read_rtstruct(rtstruct_path: Path, reference: sitk.Image, options: MaskOptions | None = None) -> MaskResult:
    """Rasterize the selected RTSTRUCT ROIs onto ``reference``'s grid, with their accounting.

    Selection: ROIs whose name contains a match of the regex ``options.roi_pattern`` (case-insensitive;
    default: names containing "lesion"), all merged into label 1; or ``options.roi_labels``
    {regex: label}, where an ROI takes the label of the first pattern it matches (unmatched ROIs are
    ignored; where ROIs of different labels overlap the first-listed pattern's label wins).
    Contours: each CLOSED_PLANAR plane goes to the nearest reference slice (the closest plane wins
    when several map to one slice); voxel centres inside a contour are set and the contours of one
    ROI on one plane combine by XOR, so holes stay holes. A plane more than half a slice outside the
    grid, or a contour outside it in-plane, is cut off (counted; a lesion entirely outside is lost).
    The RTSTRUCT's FrameOfReferenceUID must equal the reference's (metadata ``0020|0052``; the error
    names both). Raises ``MaskError`` listing the available ROI names when none matches. A
    ROIContourSequence item whose ReferencedROINumber names no ROI is a loss (its contours cannot be
    selected). Losses are recorded in the structures; :func:`check_structures` decides.
    """
    import SimpleITK as sitk

    options = options or MaskOptions()
    path = Path(rtstruct_path)
    ds = _read_rtstruct(path)
    names = {int(roi.ROINumber): str(roi.get("ROIName", "")).strip() for roi in ds.StructureSetROISequence}
    for number, name in names.items():  # free text: a pseudonymized run names the ROI by its number
        register_identifier(name, f"ROI#{number}")
    roi_frames = {
        int(roi.ROINumber): str(roi.get("ReferencedFrameOfReferenceUID", "")).strip() for roi in ds.StructureSetROISequence
    }
    chosen = _select_rois(path, names, options.roi_pattern, options.roi_labels)
    for number in chosen:
        uid = roi_frames.get(number) or str(ds.get("FrameOfReferenceUID", "")).strip()
        _check_frame_of_reference(path, uid, reference, f"ROI {names[number]!r}")

    contours_by_roi: dict[int, list] = {}
    dangling: list[MaskStructure] = []
    for item in ds.get("ROIContourSequence", []):
        number = int(item.get("ReferencedROINumber", -1))
        contours = list(item.get("ContourSequence", []))
        if number not in names:
            if contours:
                orphan = MaskStructure(str(path), "ROI", f"#{number} (not in StructureSetROISequence)", 0)
                orphan.lost.append(
                    f"ROIContourSequence (3006,0039) item with ReferencedROINumber (3006,0084) {number}: no ROI of that "
                    f"number in StructureSetROISequence (3006,0020), so its {_plural(len(contours), 'contour')} "
                    "cannot be selected"
                )
                dangling.append(orphan)
            continue
        contours_by_roi.setdefault(number, []).extend(contours)

    size = reference.GetSize()
    out = np.zeros(size[::-1], dtype=np.uint8)
    label_order = list(dict.fromkeys((options.roi_labels or {options.roi_pattern: 1}).values()))
    order = sorted(chosen, key=lambda n: (label_order.index(chosen[n]), list(names).index(n)))
    structures = []
    masks = {}
    for number in reversed(order):  # paint in reverse priority: the first-listed pattern's label ends on top
        structure = MaskStructure(str(path), "ROI", names[number], chosen[number])
        window, crop = _rasterize_roi(path, structure, contours_by_roi.get(number, []), reference)
        if window is not None:
            out[window][crop] = chosen[number]
        masks[number] = (window, crop)
        structures.append(structure)
    structures.reverse()
    for structure, number in zip(structures, order):
        window, crop = masks[number]
        binary = crop & (out[window] == structure.label) if window is not None else crop
        overwritten = _components_missing(crop, binary)
        if overwritten:
            structure.lost.append(f"{_plural(overwritten, 'lesion')} entirely under ROIs of another label")
        elif binary.sum() < crop.sum():
            structure.notes.append(f"{int(crop.sum() - binary.sum())} voxels claimed by ROIs of another label")
        offset = (window[2].start, window[1].start, window[0].start) if window is not None else (0, 0, 0)
        _record(structure, "reference", binary, reference, offset=offset)
    _log_structures(structures)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    ordered = sorted(structures, key=lambda s: list(names.values()).index(s.name))
    return MaskResult(image, ordered + dangling)


def rasterize_rtstruct(
    rtstruct_path: Path,
    reference: sitk.Image,
    roi_pattern: str = DEFAULT_ROI_PATTERN,
    roi_labels: Mapping[str, int] | None = None,
) -> tuple[sitk.Image, list[str]]:
    """:func:`read_rtstruct` as (uint8 label map on ``reference``, names of the ROIs used), without accounting."""
    result = read_rtstruct(rtstruct_path, reference, MaskOptions(roi_pattern=roi_pattern, roi_labels=roi_labels))
    return result.label, [s.name for s in result.structures if s.label]


# ----------------------------------------------------------------------------------------------
# DICOM SEG
# ----------------------------------------------------------------------------------------------


def _select_segments(path: Path, seg: Any, options: MaskOptions, keep_segment_numbers: bool) -> dict[int, int]:
    """Segment number -> output label. Segment 0 (the LABELMAP background) is never selected; a
    segment labelled 'Background' only when a pattern asks for it."""
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")).strip() for s in seg.SegmentSequence}
    for number, name in segments.items():  # free text: a pseudonymized run names it by number
        register_identifier(name, f"segment#{number}")
    candidates = {n: label for n, label in segments.items() if n != 0}
    chosen: dict[int, int] = {}
    if options.roi_labels:
        compiled = _compile_patterns(options.roi_labels)
        for n, text in candidates.items():
            match = next((label for regex, label in compiled if regex.search(text)), None)
            if match is not None:
                chosen[n] = match
        wanted = " or ".join(repr(p) for p in options.roi_labels)
    elif options.seg_pattern is not None:
        regex = _compile_patterns({options.seg_pattern: 1})[0][0]
        chosen = {n: (n if keep_segment_numbers else 1) for n, text in candidates.items() if regex.search(text)}
        wanted = repr(options.seg_pattern)
    else:
        skipped = [n for n, text in candidates.items() if BACKGROUND_LABEL.match(text)]
        for n in skipped:
            logger.info("%s: segment %d %r is a background segment: not used", path, n, candidates[n])
        chosen = {n: (n if keep_segment_numbers else 1) for n in candidates if n not in skipped}
        wanted = "any segment other than the background"
    if not chosen:
        available = ", ".join(f"{n}: {label!r}" for n, label in segments.items()) or "none"
        raise MaskError(f"{path}: no SegmentLabel (0062,0005) matches {wanted}; segments: {available}")
    if any(not 1 <= v <= 255 for v in chosen.values()):
        raise MaskError(f"{path}: segment numbers {sorted(chosen)} do not fit a uint8 label map; map them with --roi-labels")
    return chosen


def read_seg(seg_path: Path, reference: sitk.Image, options: MaskOptions | None = None,
             keep_segment_numbers: bool = False) -> MaskResult:  # fmt: skip
    """Read the selected segments of a DICOM SEG (highdicom) onto ``reference``'s grid, with accounting.

    Selection: ``options.roi_labels`` {regex: label} on SegmentLabel (0062,0005) (first match wins),
    else ``options.seg_pattern`` (regex; ``None``: every segment except the background), merged into
    label 1 or, with ``keep_segment_numbers``, labelled by SegmentNumber (0062,0004). Where segments
    of different labels overlap the first-listed pattern, else the lower segment number, wins.
    SegmentationType (0062,0001): BINARY (a voxel > 0 is in the segment), FRACTIONAL (at least
    :data:`FRACTIONAL_THRESHOLD` of MaximumFractionalValue), LABELMAP (pixel value = segment number,
    0 the background). Frames the SEG omitted are empty; the SEG's own grid (the span of its frames)
    is resampled onto ``reference`` with ``resample_mask_to`` when it differs, so frames outside the
    reference lose their lesions (recorded). Raises ``MaskError`` on a FrameOfReferenceUID mismatch,
    an unreadable SEG, or when no segment matches (listing the available labels).
    """
    import highdicom as hd
    import SimpleITK as sitk

    options = options or MaskOptions()
    path = Path(seg_path)
    try:
        seg = hd.seg.segread(path)
    except Exception as e:
        raise MaskError(f"{path}: not readable as DICOM SEG: {type(e).__name__}: {e}") from e
    _check_frame_of_reference(path, str(seg.get("FrameOfReferenceUID", "")).strip(), reference, "SEG")
    seg_type = str(seg.get("SegmentationType", "")).strip().upper()
    chosen = _select_segments(path, seg, options, keep_segment_numbers)
    numbers = sorted(chosen)
    segment_labels = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")).strip() for s in seg.SegmentSequence}
    try:
        volume = seg.get_volume(segment_numbers=numbers, combine_segments=False, rescale_fractional=True)
    except Exception as e:
        raise MaskError(f"{path}: the SEG frames do not form one regular volume: {type(e).__name__}: {e}") from e
    array = np.asarray(volume.array)  # (slices, rows, columns, segments) in the SEG's own geometry
    if array.ndim == 3:
        array = array[..., None]
    if seg_type == "FRACTIONAL" or np.issubdtype(array.dtype, np.floating):
        binary = array >= FRACTIONAL_THRESHOLD
    else:
        binary = array > 0

    affine = np.asarray(volume.affine, dtype=np.float64)  # array index (i, j, k) -> patient mm
    axes = affine[:3, [2, 1, 0]]  # SimpleITK x, y, z = array axes 2, 1, 0
    spacing = np.linalg.norm(axes, axis=0)
    seg_grid = sitk.Image([int(v) for v in binary.shape[2::-1]], sitk.sitkUInt8)
    seg_grid.SetSpacing(tuple(float(v) for v in spacing))
    seg_grid.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    seg_grid.SetDirection(tuple(float(v) for v in (axes / spacing).ravel()))
    # highdicom may order the frames against the reference's slice direction: flip / permute the
    # axes to the reference's orientation (exact, no interpolation) so equal grids are recognised.
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())

    def on_grid(array: np.ndarray) -> np.ndarray:
        piece = sitk.GetImageFromArray(array.astype(np.uint8))
        piece.CopyInformation(seg_grid)
        return sitk.GetArrayFromImage(sitk.DICOMOrient(piece, orientation)) > 0

    grid = sitk.DICOMOrient(seg_grid, orientation)
    binary = np.stack([on_grid(binary[..., c]) for c in range(binary.shape[3])], axis=-1)

    label_order = list(dict.fromkeys(options.roi_labels.values())) if options.roi_labels else []

    def priority(channel: int) -> tuple[int, int]:
        value = chosen[numbers[channel]]
        return (label_order.index(value) if value in label_order else 0, numbers[channel])

    labels = np.zeros(binary.shape[:3], dtype=np.uint8)
    for channel in sorted(range(len(numbers)), key=priority, reverse=True):  # highest priority painted last
        labels[binary[..., channel]] = chosen[numbers[channel]]
    structures = []
    for channel, number in enumerate(numbers):
        structure = MaskStructure(str(path), "segment", f"{number} {segment_labels.get(number, '')}".strip(), chosen[number])
        own = binary[..., channel]
        kept = own & (labels == structure.label)
        _record(structure, "drawn", own, grid, footprint=kept)
        if not own.any():
            structure.lost.append(f"empty in the SEG ({seg_type or 'BINARY'}: no voxel in any frame)")
        elif _components_missing(own, kept):
            structure.lost.append("entirely under segments of another label")
        if int(own.sum()) > int(kept.sum()):
            structure.notes.append(f"{int(own.sum() - kept.sum())} voxels claimed by segments of another label")
        structures.append(structure)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(grid)
    if same_geometry(image, reference):
        image.CopyInformation(reference)
        place_structures(structures, grid, image, "reference")
    else:
        image, report = resample_mask_to(image, reference, log_messages=False)  # the structures say what was lost
        _log_resample_report(path, "SEG", report)
        place_structures(structures, grid, image, "reference")
    _log_structures(structures)
    return MaskResult(image, structures)


def read_dicom_seg(seg_path: Path, reference: sitk.Image, segment_pattern: str | None = None,
                   keep_segment_numbers: bool = False) -> sitk.Image:  # fmt: skip
    """:func:`read_seg` as a uint8 label map on ``reference``'s grid, without accounting."""
    return read_seg(seg_path, reference, MaskOptions(seg_pattern=segment_pattern), keep_segment_numbers).label


def _log_resample_report(path: Path, what: str, report: Any) -> None:
    """One line of lesion bookkeeping per resampled mask: a warning when a lesion was lost, rescued
    or merged with a neighbour (the count after is then lower), else info."""
    changed = report.lost_lesions or report.rescued_lesions or report.merged_lesions
    logger.log(
        logging.WARNING if changed else logging.INFO,
        "%s: %s resampled onto the reference: %d lesions before, %d after, %d rescued, %d lost, %d merged",
        path, what, report.lesions_before, report.lesions_after, report.rescued_lesions, report.lost_lesions,
        report.merged_lesions,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# NIfTI (or any label image)
# ----------------------------------------------------------------------------------------------


def _value_examples(values: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:n])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > n else "")


def labels_from_image(image: sitk.Image, path: Path | str, options: MaskOptions | None = None,
                      merge: bool = False, allowed: Sequence[int] | None = None) -> MaskResult:  # fmt: skip
    """A label image (NIfTI, MHA, ...) already read as a uint8 label map on its own grid, with accounting.

    Values must be integers in 0..255; a mask with other values (a probability or partial-volume
    mask: 0.5 would be truncated to 0 by a cast) raises ``MaskError`` naming the file and the values,
    unless ``options.mask_threshold`` T is set: then ``value >= T`` is label 1 (an integer label map
    is never thresholded, so several labels stay apart). ``merge``: every
    value > 0 becomes label 1 (each value stays its own structure in the accounting). ``allowed``:
    the label values the dataset has (others raise). Structures: one per value present (a mask
    without any lesion is fine: there is nothing to lose).
    """
    import SimpleITK as sitk

    options = options or MaskOptions()
    path = str(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MaskError(f"{path}: expected a 3D single-channel label map, got {image.GetDimension()}D "
                        f"with {image.GetNumberOfComponentsPerPixel()} components")  # fmt: skip
    array = sitk.GetArrayFromImage(image)
    notes = []
    if array.size and not np.all(np.isfinite(array)):
        raise MaskError(f"{path}: the mask holds NaN or infinite values")
    fractional = np.issubdtype(array.dtype, np.floating) and array.size and not np.all(np.mod(array, 1) == 0)
    if fractional:
        odd = np.unique(array[np.mod(array, 1) != 0])
        if options.mask_threshold is None:
            raise MaskError(
                f"{path}: mask values are not integers ({_value_examples(odd)}; {int(np.isin(array, odd).sum())} voxels): "
                "a probability or partial-volume mask; pass --mask-threshold T to take value >= T as lesion"
            )
        t = options.mask_threshold
        array = (array >= t).astype(np.uint8)
        notes.append(f"non-integer mask thresholded at {t:g} (--mask-threshold): {int(array.sum())} lesion voxels")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise MaskError(f"{path}: label values must be integers in 0..255 (found {array.min():g}..{array.max():g})")
    array = array.astype(np.uint8)
    values = [int(v) for v in np.unique(array) if v != 0]
    if allowed is not None and not set(values) <= set(allowed):
        raise MaskError(f"{path}: label values {sorted(set(values) - set(allowed))} are not among the dataset's labels "
                        f"{sorted(allowed)}")  # fmt: skip
    out = (array > 0).astype(np.uint8) if merge else array
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(image)
    structures = []
    for value in values:
        structure = MaskStructure(path, "label", f"value {value}", 1 if merge else value)
        structure.notes.extend(notes)
        _record(structure, "drawn", array == value, labels)
        structures.append(structure)
    return MaskResult(labels, structures)


def place_mask_on(result: MaskResult, reference: sitk.Image, stage: str) -> MaskResult:
    """``result`` on ``reference``'s grid: copied when on it (within 1e-3 mm), else resampled with
    ``resample_mask_to``; every structure followed onto it (``stage`` names the new grid)."""
    if same_geometry(result.label, reference):
        label = _copy_geometry(result.label, reference)
    else:
        label, report = resample_mask_to(result.label, reference, log_messages=False)  # the structures report
        _log_resample_report(Path(result.structures[0].file) if result.structures else Path("mask"), "mask", report)
    place_structures(result.structures, result.label, label, stage)
    return MaskResult(label, result.structures)


def _copy_geometry(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    import SimpleITK as sitk

    out = sitk.Image(image)
    out.CopyInformation(reference)
    return out


def read_nifti_mask(path: Path, reference: sitk.Image, options: MaskOptions | None = None) -> sitk.Image:
    """Read a NIfTI (or any SimpleITK-readable) label map as uint8 on ``reference``'s grid.

    Values must be integers in 0..255 (a float mask holding 0.0/1.0 is fine; see
    :func:`labels_from_image` for non-integer masks). A mask on the reference grid (within 1e-3 mm)
    gets the reference's exact geometry; any other grid is resampled with ``resample_mask_to``.
    """
    from nnunetv2_l1dfl.conversion.image_io import read_image

    path = Path(path)
    result = labels_from_image(read_image(path, "mask"), path, options)
    return place_mask_on(result, reference, "reference").label
