"""Synthetic DICOM writers for tests: PET and CT image series, RTSTRUCT and SEG.

Everything is written with pydicom (highdicom for SEG) into a folder chosen by the test, small and
fast (64^3 volumes write in well under a second). Conventions shared by every writer:

- Volumes are numpy arrays indexed ``(z, y, x)`` = (slice, row, column), like
  ``SimpleITK.GetArrayFromImage``.
- ``spacing`` and ``origin`` are in SimpleITK order ``(x, y, z)`` in mm; ``origin`` is the centre of
  voxel ``[0, 0, 0]`` in patient (LPS) coordinates. ``spacing[2]`` is the distance between slices.
- ``orientation`` is ImageOrientationPatient (row cosine, column cosine); slice ``k`` lies at
  ``origin + k * spacing[2] * (row x column)``, so ``SimpleITK.ReadImage`` of the result has the
  direction ``(row, column, row x column)`` as columns.
- Files are named ``<prefix>_<k:03d>.dcm`` for slice ``k``; the writers return them in slice order.

Values are stored as int16 with a per-slice RescaleSlope / RescaleIntercept (PET: slope =
max|slice| / 32767, so slopes differ between slices, as on real scanners), so what a reader gets
back equals the input up to that quantization (relative error < 1/32767 of the slice maximum).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

PET_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.128"  # Positron Emission Tomography Image Storage
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage

# Attributes that live in the first item of RadiopharmaceuticalInformationSequence (0054,0016);
# ``overrides``/``omit`` with these keywords act on that item instead of the top-level dataset.
RADIOPHARMACEUTICAL_KEYWORDS = frozenset(
    {
        "Radiopharmaceutical",
        "RadiopharmaceuticalStartTime",
        "RadiopharmaceuticalStartDateTime",
        "RadionuclideTotalDose",
        "RadionuclideHalfLife",
        "RadionuclidePositronFraction",
        "RadiopharmaceuticalVolume",
    }
)

PrivateElements = Mapping[tuple[int, int], tuple[str, Any]]


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _slice_geometry(
    n_slices: int, spacing: Sequence[float], origin: Sequence[float], orientation: Sequence[float]
) -> tuple[np.ndarray, list[np.ndarray]]:
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    positions = [np.asarray(origin, float) + k * float(spacing[2]) * normal for k in range(n_slices)]
    return normal, positions


def _ds_number(value: float) -> str:
    """A DS string (at most 16 characters) that round-trips ``value`` as closely as DS allows."""
    for digits in range(15, 5, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value!r} as a DICOM DS")


def _apply_overrides(
    ds: Dataset, rp_item: Dataset | None, overrides: Mapping[str, Any], omit: Sequence[str]
) -> None:
    for keyword, value in overrides.items():
        target = rp_item if (rp_item is not None and keyword in RADIOPHARMACEUTICAL_KEYWORDS) else ds
        setattr(target, keyword, value)
    for keyword in omit:
        target = rp_item if (rp_item is not None and keyword in RADIOPHARMACEUTICAL_KEYWORDS) else ds
        if keyword in target:
            delattr(target, keyword)


def _write_image_series(
    folder: Path,
    volume: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    *,
    modality: str,
    sop_class_uid: str,
    prefix: str,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    study_date: str,
    series_time: str,
    series_description: str,
    orientation: Sequence[float],
    slopes: Sequence[float],
    intercepts: Sequence[float],
    fill: Any,
    private: PrivateElements,
    omit: Sequence[str],
    overrides: Mapping[str, Any],
) -> list[Path]:
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (z, y, x), got shape {volume.shape}")
    folder = Path(folder)
    n_slices, rows, cols = volume.shape
    _, positions = _slice_geometry(n_slices, spacing, origin, orientation)
    paths = []
    for k in range(n_slices):
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class_uid, sop_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time
        ds.Modality = modality
        ds.Manufacturer = "Synthetic"
        ds.ManufacturerModelName = "l1dfl-tests"
        ds.StudyDescription = "synthetic PET/CT"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 2 if modality == "PT" else 1
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds_number(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds_number(v) for v in orientation]
        ds.SliceThickness = _ds_number(float(spacing[2]))
        ds.SliceLocation = _ds_number(float(positions[k][2]))
        ds.PixelSpacing = [_ds_number(float(spacing[1])), _ds_number(float(spacing[0]))]  # row, column
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        slope, intercept = float(slopes[k]), float(intercepts[k])
        ds.RescaleSlope = _ds_number(slope)
        ds.RescaleIntercept = _ds_number(intercept)
        # Quantize with the slope exactly as written in the header, so reading back is exact.
        stored = np.rint((volume[k] - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = np.clip(stored, -32768, 32767).astype("<i2").tobytes()
        rp_item = fill(ds, k)
        for (group, element), (vr, value) in private.items():
            ds.add_new((group, element), vr, value)
        _apply_overrides(ds, rp_item, overrides, omit)
        paths.append(_save(ds, folder / f"{prefix}_{k:03d}.dcm"))
    return paths


def write_pet_series(
    folder: Path,
    volume_bqml: np.ndarray,
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    patient_id: str = "PAT001",
    patient_name: str = "SYNTHETIC^PATIENT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_date: str = "20240101",
    weight_kg: float | str = 75.0,
    dose_bq: float | str = 3.5e8,
    injection_time: str = "100000",
    series_time: str = "110000",
    half_life: float = 6586.2,
    units: str = "BQML",
    decay_correction: str = "START",
    acquisition_times: Sequence[str] | None = None,
    frame_duration_ms: int = 300000,
    frame_reference_times_ms: Sequence[float] | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    tracer: str = "FDG",
    private: PrivateElements | None = None,
    private_creator: str | None = None,
    omit: Sequence[str] = (),
    prefix: str = "pet",
    **overrides: Any,
) -> list[Path]:
    """Write a PET series (one file per slice) and return the paths in slice order.

    volume_bqml: (z, y, x) values that a reader gets after RescaleSlope/Intercept: activity in
        Bq/ml for ``units="BQML"`` (the tag (0054,1001) is written as given, so pass SUV values with
        ``units="GML"``, counts with ``"CNTS"``, and so on). Each slice gets its own slope.
    spacing, origin: (x, y, z) in mm, see the module docstring.
    weight_kg: PatientWeight (0010,1030), written as given (pass grams to test that sanity rule).
    dose_bq: RadionuclideTotalDose (0018,1074), written as given (pass MBq to test that rule).
    injection_time: HHMMSS; written as RadiopharmaceuticalStartTime (0018,1072) and, on
        ``study_date``, as RadiopharmaceuticalStartDateTime (0018,1078).
    series_time: HHMMSS, written as Study/Series/Acquisition/Content time (all slices).
    acquisition_times: per-slice AcquisitionTime (0008,0032), e.g. for multi-bed or DC=NONE tests.
    frame_duration_ms: ActualFrameDuration (0018,1242).
    frame_reference_times_ms: per-slice FrameReferenceTime (0054,1300); default half the frame
        duration for every slice.
    private: {(group, element): (VR, value)} added to every slice, e.g. Philips
        ``{(0x7053, 0x1000): ("DS", "0.0005")}``; elements must be in block 0x10 (gggg,10xx).
    private_creator: written at (gggg,0010) for each private group used (e.g.
        ``"Philips PET Private Group"``); by default none, as in the IBSI DROs and many exports.
    omit: keywords to delete from every slice (``"PatientWeight"``, ``"RadiopharmaceuticalStartTime"``,
        ...); radiopharmaceutical keywords act on the (0054,0016) item.
    overrides: keyword=value set on every slice after everything else (same routing as ``omit``).

    Edge cases: slices that are all zero get slope 1; values are clipped to the int16 range.
    """
    volume = np.asarray(volume_bqml, dtype=np.float64)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    n_slices = volume.shape[0]
    slopes = [max(float(np.abs(volume[k]).max()) / 32767.0, 1e-6) if volume[k].any() else 1.0 for k in range(n_slices)]
    if acquisition_times is not None and len(acquisition_times) != n_slices:
        raise ValueError(f"acquisition_times needs {n_slices} entries, got {len(acquisition_times)}")
    private = dict(private or {})
    private_creators = {group for group, _ in private}

    def fill(ds: Dataset, k: int) -> Dataset:
        # DECY only when decay-corrected (DecayCorrection START / ADMIN), as the IBSI DROs write it
        ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT"] + (["DECY"] if decay_correction.upper() != "NONE" else []) + ["RAN"]
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.Units = units
        ds.DecayCorrection = decay_correction
        ds.CountsSource = "EMISSION"
        ds.RescaleType = "BQML" if units == "BQML" else units
        ds.PatientWeight = _ds_number(float(weight_kg)) if not isinstance(weight_kg, str) else weight_kg
        ds.PatientSize = "1.75"
        ds.ActualFrameDuration = int(frame_duration_ms)
        ds.FrameReferenceTime = _ds_number(
            float(frame_reference_times_ms[k]) if frame_reference_times_ms is not None else frame_duration_ms / 2
        )
        ds.DecayFactor = "1.0"
        if acquisition_times is not None:
            ds.AcquisitionTime = acquisition_times[k]
        item = Dataset()
        item.Radiopharmaceutical = tracer
        item.RadiopharmaceuticalStartTime = injection_time
        item.RadiopharmaceuticalStartDateTime = study_date + injection_time
        item.RadionuclideTotalDose = _ds_number(float(dose_bq)) if not isinstance(dose_bq, str) else dose_bq
        item.RadionuclideHalfLife = _ds_number(float(half_life))
        item.RadionuclidePositronFraction = "0.9673"
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([item])
        if private_creator is not None:
            for group in private_creators:
                ds.add_new((group, 0x0010), "LO", private_creator)
        return item

    return _write_image_series(
        folder, volume, spacing, origin, modality="PT", sop_class_uid=PET_SOP_CLASS, prefix=prefix,
        patient_id=patient_id, patient_name=patient_name, study_uid=study_uid, series_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid, study_date=study_date, series_time=series_time,
        series_description="PET synthetic", orientation=orientation, slopes=slopes,
        intercepts=[0.0] * n_slices, fill=fill, private=private, omit=omit, overrides=overrides,
    )  # fmt: skip


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    *,
    patient_id: str = "PAT001",
    patient_name: str = "SYNTHETIC^PATIENT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_date: str = "20240101",
    series_time: str = "105500",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    rescale_slope: float | Sequence[float] = 1.0,
    rescale_intercept: float | Sequence[float] = -1024.0,
    private: PrivateElements | None = None,
    omit: Sequence[str] = (),
    prefix: str = "ct",
    **overrides: Any,
) -> list[Path]:
    """Write a CT series (one file per slice) and return the paths in slice order.

    hu: (z, y, x) Hounsfield units (what a reader gets after the rescale).
    spacing, origin: (x, y, z) in mm, see the module docstring.
    rescale_slope, rescale_intercept: scalars or one value per slice (per-slice values test that a
        reader applies each slice's own rescale). Stored values are rounded to integers.
    omit, overrides, private: as for :func:`write_pet_series` (no private creator is written).
    """
    hu = np.asarray(hu, dtype=np.float64)
    n_slices = hu.shape[0]
    slopes = [rescale_slope] * n_slices if np.isscalar(rescale_slope) else list(rescale_slope)
    intercepts = [rescale_intercept] * n_slices if np.isscalar(rescale_intercept) else list(rescale_intercept)
    private = dict(private or {})

    def fill(ds: Dataset, k: int) -> None:
        ds.KVP = "120"
        ds.RescaleType = "HU"
        return None

    return _write_image_series(
        folder, hu, spacing, origin, modality="CT", sop_class_uid=CT_SOP_CLASS, prefix=prefix,
        patient_id=patient_id, patient_name=patient_name, study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        frame_of_reference_uid=frame_of_reference_uid or generate_uid(), study_date=study_date,
        series_time=series_time, series_description="CT synthetic", orientation=orientation,
        slopes=slopes, intercepts=intercepts, fill=fill, private=private, omit=omit, overrides=overrides,
    )  # fmt: skip


def _read_reference_headers(reference_files: Sequence[Path]) -> list[Dataset]:
    """Reference slices sorted along their normal (the order the masks' z axis follows)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in reference_files]
    if not headers:
        raise ValueError("reference_files is empty")
    iop = np.asarray(headers[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(headers, key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, float))))


def _mask_contours(mask_slice: np.ndarray) -> list[np.ndarray]:
    """Closed contours (row, column in voxel units) of a binary slice at level 0.5.

    The contours run halfway between voxel centres, so rasterizing them with the even-odd rule on
    the same grid gives the mask back exactly (holes become inner contours).
    """
    from skimage.measure import find_contours

    padded = np.pad(mask_slice.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    return [c[:-1] - 1.0 for c in contours]  # drop the repeated closing point, undo the padding


def write_rtstruct(
    path: Path,
    reference_files: Sequence[Path],
    rois: Mapping[str, np.ndarray],
    *,
    frame_of_reference_uid: str | None = None,
    series_uid: str | None = None,
) -> Path:
    """Write an RTSTRUCT whose ROIs outline the given masks, and return ``path``.

    reference_files: the image series the masks live on (any order; sorted here along the normal).
    rois: ROI name -> binary mask (z, y, x) with the referenced series' shape. Each slice's contours
        come from marching squares at level 0.5 (halfway between voxel centres, holes as inner
        contours), converted to patient coordinates in mm; an empty mask gives an ROI without
        contours.
    frame_of_reference_uid: written instead of the reference's, to test the mismatch check.
    """
    headers = _read_reference_headers(reference_files)
    first = headers[0]
    shape = (len(headers), int(first.Rows), int(first.Columns))
    iop = np.asarray(first.ImageOrientationPatient, float)
    row_cos, col_cos = iop[:3], iop[3:]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    for_uid = frame_of_reference_uid or str(first.FrameOfReferenceUID)

    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(RTSTRUCT_SOP_CLASS, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    now = _dt.datetime(2024, 1, 2, 12, 0, 0)
    ds.StudyDate = first.StudyDate
    ds.StudyTime = first.StudyTime
    ds.SeriesDate = ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.StructureSetTime = now.strftime("%H%M%S")
    ds.Modality = "RTSTRUCT"
    ds.Manufacturer = "Synthetic"
    ds.SeriesDescription = "contours synthetic"
    ds.PatientName = first.PatientName
    ds.PatientID = first.PatientID
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = first.get("StudyID", "1")
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.StructureSetLabel = "lesions"

    contour_images = []
    for h in headers:
        ref = Dataset()
        ref.ReferencedSOPClassUID = h.SOPClassUID
        ref.ReferencedSOPInstanceUID = h.SOPInstanceUID
        contour_images.append(ref)
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = first.SeriesInstanceUID
    rt_series.ContourImageSequence = DicomSequence(contour_images)
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    rt_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    rt_study.RTReferencedSeriesSequence = DicomSequence([rt_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_for.RTReferencedStudySequence = DicomSequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref_for])

    roi_items, contour_items, observation_items = [], [], []
    for number, (name, mask) in enumerate(rois.items(), start=1):
        mask = np.asarray(mask).astype(bool)
        if mask.shape != shape:
            raise ValueError(f"ROI {name!r}: mask shape {mask.shape} differs from the reference grid {shape}")
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(roi)

        contours = []
        for k, h in enumerate(headers):
            if not mask[k].any():
                continue
            ipp = np.asarray(h.ImagePositionPatient, float)
            for rc in _mask_contours(mask[k]):
                points = ipp + np.outer(rc[:, 1] * col_spacing, row_cos) + np.outer(rc[:, 0] * row_spacing, col_cos)
                contour = Dataset()
                image_ref = Dataset()
                image_ref.ReferencedSOPClassUID = h.SOPClassUID
                image_ref.ReferencedSOPInstanceUID = h.SOPInstanceUID
                contour.ContourImageSequence = DicomSequence([image_ref])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour.ContourData = [_ds_number(round(float(v), 6)) for v in points.ravel()]
                contours.append(contour)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = [255, 0, 0]
        roi_contour.ReferencedROINumber = number
        if contours:
            roi_contour.ContourSequence = DicomSequence(contours)
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "GTV"
        observation.ROIInterpreter = ""
        observation_items.append(observation)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    return _save(ds, Path(path))


def write_seg(
    path: Path,
    reference_files: Sequence[Path],
    segments: Mapping[str, np.ndarray],
    *,
    omit_empty_frames: bool = True,
    segmentation_type: str = "BINARY",
) -> Path:
    """Write a DICOM SEG (highdicom) of the given masks, and return ``path``.

    reference_files: the image series the masks live on (any order; sorted here along the normal).
    segments: segment label -> binary mask (z, y, x) on the referenced grid; segment numbers are
        1, 2, ... in the mapping's order. Empty frames are left out (highdicom's default), as
        most SEG writers do, so readers must fill them.
    segmentation_type: ``BINARY`` (default); ``FRACTIONAL`` (the masks are probabilities in [0, 1],
        stored as PROBABILITY with MaximumFractionalValue 255); ``LABELMAP`` (the masks must not
        overlap; stored as one label map, highdicom adds segment 0 'Background').
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    headers = _read_reference_headers(reference_files)
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in reference_files}
    sources = [pydicom.dcmread(by_uid[str(h.SOPInstanceUID)]) for h in headers]
    if not segments:
        raise ValueError("segments is empty")
    fractional = segmentation_type == "FRACTIONAL"
    arrays = [np.asarray(m, dtype=np.float32) if fractional else np.asarray(m).astype(bool) for m in segments.values()]
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    for name, array in zip(segments, arrays):
        if array.shape != shape:
            raise ValueError(f"segment {name!r}: mask shape {array.shape} differs from the reference grid {shape}")
    if fractional:
        pixel_array = np.stack(arrays, axis=-1)  # (frames, rows, columns, segments), floats in [0, 1]
    elif segmentation_type == "LABELMAP":
        pixel_array = np.zeros(shape, dtype=np.uint8)
        for number, array in enumerate(arrays, start=1):
            pixel_array[array] = number
    else:
        pixel_array = np.stack(arrays, axis=-1).astype(np.uint8)  # (frames, rows, columns, segments)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            algorithm_identification=None,
        )
        for number, name in enumerate(segments, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Synthetic",
        manufacturer_model_name="l1dfl-tests",
        software_versions="1.0",
        device_serial_number="0",
        omit_empty_frames=omit_empty_frames,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def strip_file_format(path: Path, implicit_vr: bool = True) -> Path:
    """Rewrite ``path`` as a raw data set: no 128-byte preamble, no 'DICM', no file meta.

    That is how some vendor PET exports and pydicom's ``rtstruct.dcm`` are stored; readers must
    recognise them without the marker. Implicit VR little endian by default.
    """
    ds = pydicom.dcmread(path)
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    pydicom.dcmwrite(path, ds, implicit_vr=implicit_vr, little_endian=True, enforce_file_format=False)
    return path
