"""Find DICOM series under a folder of any nesting and read image series into SimpleITK volumes.

``discover_series`` reads headers only and groups files by SeriesInstanceUID; files that are not
DICOM or lack the identifying attributes are returned with the reason instead of stopping the walk.
``load_slice_stack`` (used by ``read_ct_hu`` and the PET reader in ``suv``) sorts single-frame slices
along the slice normal by ImagePositionPatient, checks that they form one regular volume and applies
each slice's own RescaleSlope / RescaleIntercept in float32: SimpleITK's series reader takes the
pixel type and rescale from the first slice and can truncate the others.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

# SimpleITK metadata key under which the readers store the FrameOfReferenceUID (0020,0052) of the
# image they return, so mask readers can check that contours belong to the same frame of reference.
FRAME_OF_REFERENCE_KEY = "0020|0052"

# Tolerances of the geometry checks: orientation cosines, and slice gaps relative to the spacing.
ORIENTATION_TOL = 1e-4
SLICE_GAP_REL_TOL = 0.01
DEFER_BYTES = 1024  # values longer than this (pixel data) are not read during discovery


class DicomSeriesError(ValueError):
    """A series that cannot be read as one volume; the message names the file and the attribute."""


# Value representations of explicit-VR encodings (PS3.5 6.2), for sniffing files without a preamble.
_VALUE_REPRESENTATIONS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def _raw_dataset_problem(path: Path) -> str:
    """'' when a file without the 128-byte preamble and 'DICM' starts like a DICOM data set.

    Files written without the DICOM file format (no preamble, no file meta: some Philips PET
    exports, pydicom's own ``rtstruct.dcm``) begin directly with the first data element, which in
    a little-endian data set is a tag of group 0002 (file meta) or 0008 (SOP Common, always
    present: SOPClassUID (0008,0016)) followed by an explicit VR or an implicit 4-byte length that
    fits in the file. Anything else is not DICOM (or big-endian without meta, not supported).
    """
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        return f"not readable as DICOM: {len(head)} bytes"
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return (
            f"not readable as DICOM: no 'DICM' marker at byte 128 and the first tag ({group:04X},{element:04X}) "
            "is not a group 0002/0008 data element"
        )
    vr = head[4:6].decode("ascii", errors="replace")
    if vr not in _VALUE_REPRESENTATIONS and struct.unpack("<I", head[4:8])[0] > path.stat().st_size:
        return (
            f"not readable as DICOM: no 'DICM' marker at byte 128 and the first element "
            f"({group:04X},{element:04X}) has neither a VR nor a length that fits in the file"
        )
    return ""


def read_dicom(path: Path | str, stop_before_pixels: bool = False, **dcmread_kwargs: Any) -> pydicom.Dataset:
    """Read one DICOM file, with or without the 128-byte preamble and file meta information.

    Files in the DICOM file format are read as usual. Files that lack the preamble and 'DICM'
    (raw data sets, e.g. some vendor PET exports and RTSTRUCTs written by older tools) are read with
    ``force=True`` only after a sniff that the first bytes are a plausible first data element, and
    only if the result has a SOPClassUID (0008,0016) or Modality (0008,0060); the transfer syntax
    pydicom detected (implicit/explicit VR little endian) is then recorded in the file meta so the
    pixel data can be decoded. ``dcmread_kwargs`` go to ``pydicom.dcmread`` (``defer_size``,
    ``specific_tags``). Raises ``DicomSeriesError`` naming the file when it is not DICOM.
    """
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    path = Path(path)
    with open(path, "rb") as f:
        f.seek(128)
        has_marker = f.read(4) == b"DICM"
    if has_marker:
        try:
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, **dcmread_kwargs)
        except Exception as e:  # pydicom raises many types on corrupt input
            raise DicomSeriesError(f"{path}: not readable as DICOM: {type(e).__name__}: {e}") from e
    problem = _raw_dataset_problem(path)
    if problem:
        raise DicomSeriesError(f"{path}: {problem}")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True, **dcmread_kwargs)
    except Exception as e:
        raise DicomSeriesError(f"{path}: not readable as DICOM (no preamble): {type(e).__name__}: {e}") from e
    if len(ds) == 0 or ("SOPClassUID" not in ds and "Modality" not in ds and not dcmread_kwargs.get("specific_tags")):
        raise DicomSeriesError(
            f"{path}: not readable as DICOM: no preamble, and no SOPClassUID (0008,0016) or Modality (0008,0060) in the data"
        )
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found on disk (headers only).

    files: every instance of the series, sorted by path. referenced_series_uids: for RTSTRUCT and
    SEG, the SeriesInstanceUIDs of the image series they were drawn on; ``()`` otherwise.
    modality: the value most files carry; modalities: every value seen, and those the image SOP
    classes imply (a PET SOP class labelled CT still counts as PET). corrected_image: the
    CorrectedImage (0028,0051) values, ``None`` when absent. problem: '' or why the files cannot be
    one series (they disagree on an attribute of :data:`SERIES_CONSISTENT_ATTRIBUTES`; the
    message names a file and the tag): such a series must fail, never be read.
    Empty strings stand for absent attributes.
    """

    series_instance_uid: str
    modality: str
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    series_description: str
    files: tuple[Path, ...]
    referenced_series_uids: tuple[str, ...]
    patient_birth_date: str = ""
    series_number: str = ""
    corrected_image: tuple[str, ...] | None = None
    problem: str = ""
    modalities: tuple[str, ...] = ()

    @property
    def has_pet_files(self) -> bool:
        """Any file of the series says Modality PT (the series may still be mostly something else)."""
        return self.modality == "PT" or "PT" in self.modalities


# Attributes every file of one series must agree on (keyword, tag); the first disagreement makes the
# series' ``problem``: a series mixing modalities or patients is never read as one volume.
SERIES_CONSISTENT_ATTRIBUTES = (
    ("Modality", "(0008,0060)"),
    ("SOPClassUID", "(0008,0016)"),
    ("PatientID", "(0010,0020)"),
    ("PatientName", "(0010,0010)"),
    ("PatientBirthDate", "(0010,0030)"),
    ("StudyInstanceUID", "(0020,000D)"),
    ("FrameOfReferenceUID", "(0020,0052)"),
)
# What the slices handed to ``load_slice_stack`` must share, whoever grouped them.
SLICE_STACK_CONSISTENT_ATTRIBUTES = (
    ("Modality", "(0008,0060)"),
    ("SOPClassUID", "(0008,0016)"),
    ("SeriesInstanceUID", "(0020,000E)"),
    ("PatientID", "(0010,0020)"),
    ("PatientName", "(0010,0010)"),
    ("PatientBirthDate", "(0010,0030)"),
)


# Image storage SOP classes (PS3.4) and the modality they imply: CT, enhanced / legacy converted CT,
# PET, enhanced / legacy converted PET, MR, enhanced MR, enhanced MR color.
SOP_CLASS_MODALITY = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",
    "1.2.840.10008.5.1.4.1.1.128": "PT",
    "1.2.840.10008.5.1.4.1.1.130": "PT",
    "1.2.840.10008.5.1.4.1.1.128.1": "PT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",
    "1.2.840.10008.5.1.4.1.1.4.3": "MR",
}


def _sop_class_problem(members: Sequence[tuple[Path, pydicom.Dataset]]) -> str:
    """A file whose Modality (0008,0060) contradicts its image SOPClassUID (0008,0016), or ''."""
    for path, ds in members:
        sop_class = _text(ds, "SOPClassUID")
        implied = SOP_CLASS_MODALITY.get(sop_class)
        if implied and _text(ds, "Modality") != implied:
            return (
                f"{path}: Modality (0008,0060) {_text(ds, 'Modality')!r} contradicts SOPClassUID (0008,0016) "
                f"{sop_class} (a {implied} image storage class)"
            )
    return ""


def _series_problem(
    uid: str,
    members: Sequence[tuple[Path, pydicom.Dataset]],
    attributes: Sequence[tuple[str, str]] = SERIES_CONSISTENT_ATTRIBUTES,
) -> str:
    """The first attribute the files of series ``uid`` disagree on, naming a file ('' when none).

    The majority value counts as the series' own, so the message names the odd file out.
    """
    for keyword, tag in attributes:
        values = [_text(ds, keyword) for _, ds in members]
        counts = Counter(values)
        if len(counts) < 2:
            continue
        majority = counts.most_common(1)[0][0]
        odd_path, odd = next((path, v) for (path, _), v in zip(members, values) if v != majority)
        other = next(path for (path, _), v in zip(members, values) if v == majority)
        return (
            f"{odd_path}: {keyword} {tag} {odd!r} differs from {majority!r} of {other} "
            f"({counts[majority]} of {len(values)} files) in series {uid}"
        )
    return ""


def _corrected_image(ds: pydicom.Dataset) -> tuple[str, ...] | None:
    """CorrectedImage (0028,0051) values in upper case, ``None`` when the attribute is absent."""
    value = ds.get("CorrectedImage")
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in values if str(v).strip())


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _referenced_series(ds: pydicom.Dataset) -> list[str]:
    """Image series an RTSTRUCT or SEG refers to, in order of appearance, without repeats."""
    uids: list[str] = []
    if ds.get("Modality") == "RTSTRUCT":
        for frame_ref in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in frame_ref.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    uids.append(_text(series, "SeriesInstanceUID"))
    for series in ds.get("ReferencedSeriesSequence", []):  # SEG and other derived objects
        uids.append(_text(series, "SeriesInstanceUID"))
    return list(dict.fromkeys(u for u in uids if u))


def _frame_of_reference(ds: pydicom.Dataset) -> str:
    uid = _text(ds, "FrameOfReferenceUID")
    if not uid:  # RTSTRUCT keeps it in ReferencedFrameOfReferenceSequence (3006,0010)
        for frame_ref in ds.get("ReferencedFrameOfReferenceSequence", []):
            uid = _text(frame_ref, "FrameOfReferenceUID")
            if uid:
                break
    return uid


def _truncation_problem(ds: pydicom.Dataset, path: Path) -> str:
    """Why a file that pydicom parsed is nevertheless cut short ('' when it looks whole).

    pydicom stops quietly at the end of a truncated file, so an interrupted copy parses as a
    dataset that lacks its last elements: an image (Rows present) must end with its pixel data,
    and the pixel data must fit in the file.
    """
    if len(ds) == 0:
        return "not readable as DICOM: no data elements"
    if "Rows" not in ds:
        if _text(ds, "SOPClassUID") in SOP_CLASS_MODALITY:  # an image whose file ends inside the header
            return (
                f"truncated or incomplete: an image (SOPClassUID (0008,0016) {_text(ds, 'SOPClassUID')}) "
                "without Rows (0028,0010) and pixel data (7FE0,0010)"
            )
        return ""
    pixel_tags = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    present = [keyword for keyword in pixel_tags if keyword in ds]
    if not present:
        return "truncated or incomplete: image without pixel data (7FE0,0010)"
    raw = ds.get_item(present[0])
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is not None and tell is not None and length != 0xFFFFFFFF:
        if tell + length > path.stat().st_size:
            return f"truncated: pixel data (7FE0,0010) needs {tell + length} bytes, the file has {path.stat().st_size}"
    return ""


def _same_instance(a: Path, b: Path) -> bool:
    """Two files of one SOPInstanceUID hold the same data set (identical bytes, or equal once parsed:
    the same elements in another encoding); unreadable counts as different."""
    if a.read_bytes() == b.read_bytes():
        return True
    try:
        return read_dicom(a) == read_dicom(b)
    except (DicomSeriesError, OSError):
        return False


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def discover_series(root: Path, progress: bool = False) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """Group every DICOM file under ``root`` (any nesting, symlinks not followed) into series.

    Reads headers only (values over 1 KiB such as pixel data are deferred, never read). Returns the series sorted by patient ID, study
    date, StudyInstanceUID, modality and SeriesInstanceUID, and ``(file, reason)`` for each file
    that was skipped: not DICOM, unreadable or truncated (a corrupt file is reported, never fatal), no
    SeriesInstanceUID (0020,000E) (e.g. DICOMDIR), or a second copy of an SOPInstanceUID already
    seen in the series (the first path in sorted order is kept). Files without the 128-byte preamble
    are read (:func:`read_dicom`). A series whose files disagree on modality, patient, study or frame
    of reference keeps all its files and carries the reason in ``problem`` (never silently split);
    so does a series with a truncated file that has no intact copy (it would be a slice short), or
    with an unparsable file marked DICOM in a folder holding only that series' files, or with two
    copies of one SOPInstanceUID whose content differs (which one is right is not known).
    """
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM input folder not found: {root}")
    paths = sorted(
        Path(folder) / name for folder, _, names in os.walk(root) for name in names
    )
    skipped: list[tuple[Path, str]] = []
    headers: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    damaged: dict[str, list[tuple[Path, str, str]]] = {}  # series UID -> (file, problem, SOPInstanceUID)
    unreadable: list[tuple[Path, str]] = []  # files marked DICOM ('DICM' at byte 128) that do not parse
    damaged_headers: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}  # what the damaged files still say
    for path in tqdm(paths, desc="reading DICOM headers", unit="file", disable=not progress):
        # pydicom warns about malformed values; a file that gets skipped carries the first warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                # Pixel data is deferred (not read), but its element header is, to catch truncated files.
                ds = read_dicom(path, defer_size=DEFER_BYTES)
                problem = _truncation_problem(ds, path)
                uid = _text(ds, "SeriesInstanceUID")
            except Exception as e:  # pydicom raises many types on corrupt input; each is a skip reason
                reason = (
                    str(e).removeprefix(f"{path}: ")
                    if isinstance(e, DicomSeriesError)
                    else f"not readable as DICOM: {type(e).__name__}: {e}"
                )
                skipped.append((path, reason))
                if _has_dicm_marker(path):
                    unreadable.append((path, reason))
                continue
        if not problem and not uid:
            problem = "no SeriesInstanceUID (0020,000E) (not an image/RTSTRUCT/SEG instance)"
        if problem:
            note = f" (pydicom: {caught[0].message})" if caught else ""
            skipped.append((path, problem + note))
            if uid:  # its series is a file short, unless an intact copy of the instance exists
                damaged.setdefault(uid, []).append((path, problem, _text(ds, "SOPInstanceUID")))
                damaged_headers.setdefault(uid, []).append((path, ds))
            elif not problem.startswith("no SeriesInstanceUID") and _has_dicm_marker(path):
                unreadable.append((path, problem))
            continue
        for warning in caught:
            logger.debug("%s: %s", path, warning.message)
        headers.setdefault(uid, []).append((path, ds))

    unique: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    seen_sops: dict[str, dict[str, Path]] = {}
    differing: dict[str, str] = {}  # series UID -> why two copies of one instance disagree
    for uid, all_members in headers.items():
        seen = seen_sops.setdefault(uid, {})
        for path, ds in all_members:
            sop = _text(ds, "SOPInstanceUID")
            if sop and sop in seen:
                skipped.append((path, f"duplicate SOPInstanceUID (0008,0018) {sop} of {seen[sop]}"))
                if uid not in differing and not _same_instance(path, seen[sop]):
                    differing[uid] = (
                        f"{path}: duplicate SOPInstanceUID (0008,0018) {sop} of {seen[sop]}, and the two copies "
                        "differ (which one is right is not known)"
                    )
                continue
            seen[sop] = path
            unique.setdefault(uid, []).append((path, ds))
    # A DICOM file that does not parse, in a folder whose other files are all of one series, is most
    # likely a lost file of that series.
    series_in_folder: dict[Path, set[str]] = {}
    for uid, members in unique.items():
        for path, _ in members:
            series_in_folder.setdefault(path.parent, set()).add(uid)
    for path, reason in unreadable:
        uids = series_in_folder.get(path.parent, set())
        if len(uids) == 1:
            damaged.setdefault(next(iter(uids)), []).append((path, reason, ""))

    # A series whose every file is damaged is still a series found (it must not vanish from the
    # accounting): it is listed with those files and the reason, and never read.
    for uid, members in damaged_headers.items():
        if uid not in unique:
            unique[uid] = members
            seen_sops[uid] = {}

    series: list[DicomSeries] = []
    for uid, members in unique.items():
        seen = seen_sops[uid]
        problem = _series_problem(uid, members) or _sop_class_problem(members) or differing.get(uid, "")
        lost = [(path, why) for path, why, sop in damaged.get(uid, []) if not sop or sop not in seen]
        if lost and not problem:
            readable = len(members) if uid in headers else 0  # all-damaged series: none
            problem = (
                f"{lost[0][0]}: {lost[0][1]}; the series has {readable} readable files and "
                f"{len(lost)} damaged one(s) without an intact copy, so it is incomplete"
            )
        modalities = tuple(sorted(
            {_text(ds, "Modality") for _, ds in members}
            | {SOP_CLASS_MODALITY[c] for _, ds in members if (c := _text(ds, "SOPClassUID")) in SOP_CLASS_MODALITY}
        ))  # fmt: skip
        modality = Counter(_text(ds, "Modality") for _, ds in members).most_common(1)[0][0]
        first = next(ds for _, ds in members if _text(ds, "Modality") == modality)
        if problem:
            logger.info("series %s: %s", uid, problem)
        referenced = list(dict.fromkeys(u for _, ds in members for u in _referenced_series(ds)))
        series.append(
            DicomSeries(
                series_instance_uid=uid,
                modality=modality,
                study_instance_uid=_text(first, "StudyInstanceUID"),
                frame_of_reference_uid=_frame_of_reference(first),
                patient_id=_text(first, "PatientID"),
                patient_name=_text(first, "PatientName"),
                study_date=_text(first, "StudyDate"),
                series_description=_text(first, "SeriesDescription"),
                files=tuple(path for path, _ in members),
                referenced_series_uids=tuple(referenced),
                patient_birth_date=_text(first, "PatientBirthDate"),
                series_number=_text(first, "SeriesNumber"),
                corrected_image=_corrected_image(first),
                problem=problem,
                modalities=modalities,
            )
        )
    series.sort(
        key=lambda s: (s.patient_id, s.study_date, s.study_instance_uid, s.modality, s.series_instance_uid)
    )
    for path, reason in skipped:
        logger.info("skipped %s: %s", path, reason)
    return series, skipped


@dataclass
class SliceStack:
    """Single-frame slices of one series sorted along the slice normal, read as one volume.

    datasets: full pydicom datasets in slice order. array: (z, y, x) float32 after each slice's
    RescaleSlope/RescaleIntercept. spacing (x, y, z) mm, origin (mm, centre of the first voxel),
    direction (row cosine, column cosine, normal as columns, row-major 9-tuple): SimpleITK's order.
    """

    datasets: list[pydicom.Dataset]
    files: list[Path]
    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def to_image(self, array: np.ndarray | None = None) -> sitk.Image:
        """A SimpleITK image of ``array`` (default: ``self.array``) on this stack's grid.

        The image carries the FrameOfReferenceUID under the metadata key ``0020|0052``.
        """
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array if array is None else array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        frame_of_reference = _text(self.datasets[0], "FrameOfReferenceUID")
        if frame_of_reference:
            image.SetMetaData(FRAME_OF_REFERENCE_KEY, frame_of_reference)
        return image


def _floats(ds: pydicom.Dataset, keyword: str, tag: str, path: Path, count: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise DicomSeriesError(f"{path}: {keyword} {tag} missing or without {count} values")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _rescale_value(ds: pydicom.Dataset, keyword: str, tag: str, path: Path, default: float) -> float:
    """RescaleSlope / RescaleIntercept of one slice; ``default`` when absent or empty.

    An explicit slope of 0 would flatten the slice to the intercept and a non-finite value poisons
    every voxel, so both raise ``DicomSeriesError`` rather than being replaced by the default.
    """
    element = ds.get(keyword)
    text = "" if element is None else str(element).strip()
    if not text:
        return default
    try:
        value = float(element)
    except (TypeError, ValueError):
        raise DicomSeriesError(f"{path}: {keyword} {tag} is not a number: {text!r}") from None
    if not np.isfinite(value) or (keyword == "RescaleSlope" and value == 0.0):
        raise DicomSeriesError(f"{path}: {keyword} {tag} is {text!r}; the stored pixels cannot be rescaled")
    return value


def _orthonormal_axes(iop: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines of ImageOrientationPatient, checked to be unit and orthogonal.

    Within ``ORIENTATION_TOL`` (DS rounding of the cosines) they are re-orthonormalized, so the
    direction written equals the one checked; beyond it the file is refused: SimpleITK would coerce
    a non-orthonormal direction on write and move every voxel without saying so.
    """
    row, col = iop[:3], iop[3:]
    row_norm, col_norm, dot = float(np.linalg.norm(row)), float(np.linalg.norm(col)), float(np.dot(row, col))
    if abs(row_norm - 1) > ORIENTATION_TOL or abs(col_norm - 1) > ORIENTATION_TOL or abs(dot) > ORIENTATION_TOL:
        raise DicomSeriesError(
            f"{path}: ImageOrientationPatient (0020,0037) {[round(float(v), 6) for v in iop]} is not orthonormal "
            f"(|row| {row_norm:.6f}, |column| {col_norm:.6f}, row.column {dot:.6f}; tolerance {ORIENTATION_TOL})"
        )
    row = row / row_norm
    col = col - np.dot(col, row) * row
    return row, col / np.linalg.norm(col)


def _check_number_of_slices(datasets: Sequence[pydicom.Dataset], paths: Sequence[Path], what: str) -> None:
    """A PET/NM series that declares NumberOfSlices (0054,0081) must have that many files.

    A missing first or last slice leaves evenly spaced slices, so the spacing check cannot see it;
    the declared count can. ImageIndex (0054,1330), when present, names the missing slices. A series
    without NumberOfSlices (the IBSI DROs, many exports) cannot be checked this way.
    """
    declared = {str(ds.get("NumberOfSlices", "")).strip() for ds in datasets} - {"", "None"}
    if not declared:
        return
    if len(declared) > 1:
        raise DicomSeriesError(
            f"{paths[0]}: NumberOfSlices (0054,0081) differs between the files of the {what}: {sorted(declared)}"
        )
    try:
        expected = int(next(iter(declared)))
    except ValueError:
        raise DicomSeriesError(f"{paths[0]}: NumberOfSlices (0054,0081) is not a number: {declared}") from None
    if expected == len(datasets):
        return
    indices = {int(ds.ImageIndex) for ds in datasets if str(ds.get("ImageIndex", "")).strip().isdigit()}
    missing = sorted(set(range(1, expected + 1)) - indices) if len(indices) == len(datasets) else []
    raise DicomSeriesError(
        f"{paths[0]}: NumberOfSlices (0054,0081) is {expected} but the {what} has {len(datasets)} files"
        + (f"; ImageIndex (0054,1330) {', '.join(map(str, missing[:10]))} missing" if missing else "")
        + (
            " (incomplete series: a slice was lost, or its file carries another SeriesInstanceUID)"
            if len(datasets) < expected
            else " (more files than slices: a dynamic or gated series with several frames per position)"
        )
    )


def load_slice_stack(files: Sequence[Path], what: str = "series", modality: str | None = None) -> SliceStack:
    """Read single-frame slices into one regular volume, each slice with its own rescale.

    Checks (each error names the offending file): one Modality, SeriesInstanceUID and patient
    (:data:`SLICE_STACK_CONSISTENT_ATTRIBUTES`) for all files; NumberOfSlices (0054,0081), when present, equals
    the number of files; an orthonormal ImageOrientationPatient (0020,0037), one for all slices; one Rows,
    Columns and PixelSpacing (0028,0030) for all slices; no two slices at the same position along
    the normal; positions along the normal (no gantry tilt); even slice spacing (within 1 %, so a
    missing slice is an error rather than a stretched volume). Multi-frame (enhanced) objects are
    not supported. ``what`` names the series in messages (e.g. the case ID). ``modality`` set:
    every file must have that Modality (0008,0060), checked first (an MR is refused by name, not
    read as CT in HU).
    """
    if not files:
        raise DicomSeriesError(f"{what}: no files")
    datasets, paths = [], []
    for path in files:
        ds = read_dicom(path)
        if modality is not None and _text(ds, "Modality") != modality:
            description = _text(ds, "SeriesDescription") or "no SeriesDescription"
            raise DicomSeriesError(
                f"{path}: Modality (0008,0060) is {_text(ds, 'Modality') or '(missing)'!r}, not {modality} "
                f"(series {_text(ds, 'SeriesInstanceUID') or '(no SeriesInstanceUID)'}, {description}); "
                f"refusing to read it as the {modality} of the {what}"
            )
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomSeriesError(
                f"{path}: multi-frame image (NumberOfFrames (0028,0008) = {ds.NumberOfFrames}); "
                "only single-frame slice series are supported"
            )
        datasets.append(ds)
        paths.append(Path(path))

    members = list(zip(paths, datasets))
    problem = _series_problem(what, members, SLICE_STACK_CONSISTENT_ATTRIBUTES) or _sop_class_problem(members)
    if problem:
        raise DicomSeriesError(problem)
    first, first_path = datasets[0], paths[0]
    _check_number_of_slices(datasets, paths, what)
    iop = _floats(first, "ImageOrientationPatient", "(0020,0037)", first_path, 6)
    row_cos, col_cos = _orthonormal_axes(iop, first_path)
    normal = np.cross(row_cos, col_cos)
    pixel_spacing = _floats(first, "PixelSpacing", "(0028,0030)", first_path, 2)  # between rows, columns
    shape = (int(first.Rows), int(first.Columns))
    positions = []
    for ds, path in zip(datasets, paths):
        if np.abs(_floats(ds, "ImageOrientationPatient", "(0020,0037)", path, 6) - iop).max() > ORIENTATION_TOL:
            raise DicomSeriesError(
                f"{path}: ImageOrientationPatient (0020,0037) differs from {first_path} in the same {what}"
            )
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DicomSeriesError(f"{path}: Rows/Columns {ds.Rows}x{ds.Columns} differ from {first_path} {shape}")
        if np.abs(_floats(ds, "PixelSpacing", "(0028,0030)", path, 2) - pixel_spacing).max() > 1e-4:
            raise DicomSeriesError(f"{path}: PixelSpacing (0028,0030) differs from {first_path}")
        positions.append(_floats(ds, "ImagePositionPatient", "(0020,0032)", path, 3))
    along = np.array([float(np.dot(normal, p)) for p in positions])
    order = np.argsort(along, kind="stable")
    datasets = [datasets[i] for i in order]
    paths = [paths[i] for i in order]
    positions = [positions[i] for i in order]
    along = along[order]

    if len(datasets) > 1:
        gaps = np.diff(along)
        for i, gap in enumerate(gaps):
            if gap < 1e-3:
                raise DicomSeriesError(
                    f"{paths[i + 1]}: same ImagePositionPatient (0020,0032) along the normal as {paths[i]} "
                    f"({what}: duplicate slice, or a dynamic/gated series with several frames per position)"
                )
        slice_spacing = float(np.median(gaps))
        for i, gap in enumerate(gaps):
            if abs(gap - slice_spacing) > SLICE_GAP_REL_TOL * slice_spacing:
                raise DicomSeriesError(
                    f"{paths[i + 1]}: at {along[i + 1]:.3f} mm along the slice normal (ImagePositionPatient "
                    f"(0020,0032)), {gap:.3f} mm from the previous slice {paths[i]} at {along[i]:.3f} mm, but the "
                    f"{what} has {slice_spacing:.3f} mm spacing (missing slice or uneven spacing)"
                )
        for p, path in zip(positions, paths):
            offset = p - positions[0]
            in_plane = offset - np.dot(offset, normal) * normal
            if np.linalg.norm(in_plane) > 0.01 * slice_spacing + 1e-3:
                raise DicomSeriesError(
                    f"{path}: ImagePositionPatient (0020,0032) is not on the slice normal of {paths[0]} "
                    f"(gantry tilt or shifted slice in the {what}); resample it first"
                )
    else:
        slice_spacing = float(first.get("SliceThickness") or 1.0)

    array = np.empty((len(datasets),) + shape, dtype=np.float32)
    for k, (ds, path) in enumerate(zip(datasets, paths)):
        try:
            pixels = ds.pixel_array
        except Exception as e:
            raise DicomSeriesError(f"{path}: cannot decode the pixel data: {e}") from e
        slope = _rescale_value(ds, "RescaleSlope", "(0028,1053)", path, default=1.0)
        intercept = _rescale_value(ds, "RescaleIntercept", "(0028,1052)", path, default=0.0)
        array[k] = (pixels.astype(np.float64) * slope + intercept).astype(np.float32)

    direction = np.stack([row_cos, col_cos, normal], axis=1)  # columns: x, y, z axes
    return SliceStack(
        datasets=datasets,
        files=paths,
        array=array,
        spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), slice_spacing),
        origin=tuple(float(v) for v in positions[0]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def read_ct_hu(series: DicomSeries | Sequence[Path]) -> sitk.Image:
    """Read a CT series as a float32 SimpleITK image in Hounsfield units.

    Each slice's RescaleSlope (0028,1053) and RescaleIntercept (0028,1052) are applied; slices are
    sorted along the normal by ImagePositionPatient. Raises ``DicomSeriesError`` naming the file on
    inconsistent geometry (see ``load_slice_stack``), and for a file whose Modality (0008,0060) is not
    CT (an MR read as HU would be a silently wrong channel), naming the modality and the series. The image carries the FrameOfReferenceUID
    under the metadata key ``0020|0052``.
    """
    files = series.files if isinstance(series, DicomSeries) else list(series)
    what = f"CT series {series.series_instance_uid}" if isinstance(series, DicomSeries) else "CT series"
    if isinstance(series, DicomSeries) and series.problem:
        raise DicomSeriesError(series.problem)
    stack = load_slice_stack(files, what=what, modality="CT")
    return stack.to_image()
