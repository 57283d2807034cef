"""What ``l1dfl predict`` writes per study: DICOM SEG, RTSTRUCT, lesion report and a coronal MIP.

Every writer takes arrays in (z, y, x) order on the PET grid (the grid of ``prediction.nii.gz``) and,
for the DICOM objects, the source PET slice headers ordered like that z axis (``headers[k]`` is
slice ``k``). Patient, study and frame-of-reference attributes are copied from the source PET, so a
viewer shows the objects over the PET they were predicted on.

Empty predictions: a DICOM SEG must describe at least one segment and several viewers refuse a
segment without frames, and an RTSTRUCT without ROIs is refused by some RT systems; so for a study
without any predicted lesion ``seg.dcm`` and ``rtstruct.dcm`` are *not* written (the writers raise
:class:`EmptyPredictionError`), and ``lesions.json`` records why under ``outputs``. A SEG holds one
segment per label present in the prediction (segment numbers 1..m in label order; the segment label
is the nnU-Net label name).
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

    from nnunetv2_l1dfl.evaluation.quantities import LesionQuantities

logger = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
CONTOUR_DATA_TAG = 0x30060050
# RTReferencedStudySequence: ReferencedSOPClassUID of a study (Detached Study Management, as written by TPS)
STUDY_SOP_CLASS_UID = "1.2.840.10008.3.1.2.3.1"
MANUFACTURER = "nnunetv2-l1dfl"
MODEL_NAME = "l1dfl predict"
SEG_SERIES_NUMBER = 901
RTSTRUCT_SERIES_NUMBER = 902
#: Attributes copied from the source PET into every DICOM output (Patient and General Study modules).
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientAge", "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
)  # fmt: skip
_ROI_COLOURS = ((255, 0, 0), (0, 160, 255), (0, 200, 0), (255, 160, 0), (200, 0, 200), (0, 200, 200))

CSV_COLUMNS = (
    "lesion_id", "label", "n_voxels", "volume_ml", "suv_max", "suv_mean", "suv_peak", "suv_peak_at_max", "tlg",
    "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "suvmax_x_mm", "suvmax_y_mm", "suvmax_z_mm",
    "suvmax_slice", "suvmax_instance_number", "n_lesions", "tmtv_ml", "total_tlg", "dmax_mm",
)  # fmt: skip


class EmptyPredictionError(ValueError):
    """No lesion to write (see the module docstring: no empty SEG or RTSTRUCT is written)."""


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _check_headers(label_zyx: np.ndarray, headers: Sequence[pydicom.Dataset]) -> None:
    if label_zyx.ndim != 3 or len(headers) != label_zyx.shape[0]:
        raise ValueError(f"label map {label_zyx.shape} does not match {len(headers)} PET slices")
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    if label_zyx.shape[1:] != (rows, cols):
        raise ValueError(f"label map slices {label_zyx.shape[1:]} differ from the PET's Rows x Columns {(rows, cols)}")


# ----------------------------------------------------------------------------------------------
# DICOM SEG (highdicom)
# ----------------------------------------------------------------------------------------------


def write_dicom_seg(
    label_zyx: np.ndarray,
    headers: Sequence[pydicom.Dataset],
    path: Path,
    label_names: Mapping[int, str],
    algorithm_name: str,
    algorithm_version: str,
    series_description: str = "Lesions (l1dfl predict)",
) -> list[int]:
    """A BINARY DICOM SEG of the label map on the PET grid, one segment per label present.

    label_zyx: integer labels (0 background), shape (n PET slices, Rows, Columns). label_names: label
    value -> name (segment label). Segments are coded SNOMED CT "Morphologically abnormal structure"
    (49755003) / "Neoplasm" (108369006), algorithm type AUTOMATIC with the model as algorithm
    identification. Returns the labels written (segment k+1 holds label ``labels[k]``).
    Raises :class:`EmptyPredictionError` when the map holds no foreground.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from nnunetv2_l1dfl import __version__

    _check_headers(label_zyx, headers)
    present = [int(v) for v in np.unique(label_zyx) if v != 0]
    if not present:
        raise EmptyPredictionError("no lesion predicted: no DICOM SEG written")
    segment_map = np.zeros(label_zyx.shape, dtype=np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64], family=codes.cid7162.ArtificialIntelligence, version=algorithm_version[:64]
    )
    descriptions = []
    for number, value in enumerate(present, start=1):
        segment_map[label_zyx == value] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number, segment_label=str(label_names.get(value, f"label {value}"))[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )  # fmt: skip
        )
    seg = hd.seg.Segmentation(
        source_images=list(headers), pixel_array=segment_map, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME,
        software_versions=__version__, device_serial_number="0", series_description=series_description[:64],
        content_label="LESIONS", content_description="nnU-Net prediction"[:64],
    )  # fmt: skip
    seg.save_as(str(path))
    return present


# ----------------------------------------------------------------------------------------------
# RTSTRUCT (own writer: marching-squares contours at iso-level 0.5)
# ----------------------------------------------------------------------------------------------


def lesion_contours(mask_zyx: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Planar contours of a binary mask: slice index -> closed polygons, each (n, 2) of (row, col).

    scikit-image's marching squares at level 0.5 on the zero-padded slice: every contour runs through
    the midpoints between a voxel inside and its outside neighbour, so the voxel centres inside the
    polygons (even-odd rule, holes as inner contours) are exactly the voxels of the mask.
    """
    from skimage.measure import find_contours

    out: dict[int, list[np.ndarray]] = {}
    for k in np.flatnonzero(mask_zyx.any(axis=(1, 2))):
        padded = np.pad(mask_zyx[k].astype(np.float32), 1)
        polygons = []
        for contour in find_contours(padded, 0.5):
            contour = contour - 1.0
            if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
                contour = contour[:-1]
            contour = _drop_collinear(contour)
            if len(contour) >= 3:
                polygons.append(contour)
        if polygons:
            out[int(k)] = polygons
    return out


def _drop_collinear(polygon: np.ndarray) -> np.ndarray:
    """The closed polygon without vertices that lie on the straight line through their neighbours
    (marching squares put one on every voxel edge): the same polygon with far fewer points."""
    if len(polygon) < 4:
        return polygon
    before = polygon - np.roll(polygon, 1, axis=0)
    after = np.roll(polygon, -1, axis=0) - polygon
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return polygon[np.abs(cross) > 1e-9]


def _copy_patient_study(source: pydicom.Dataset, target: pydicom.Dataset) -> None:
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = source[keyword]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # type 2: present, maybe empty
        if keyword not in target:
            setattr(target, keyword, "")


def _ds(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def write_rtstruct(
    instances_zyx: np.ndarray,
    headers: Sequence[pydicom.Dataset],
    reference: sitk.Image,
    path: Path,
    roi_names: Sequence[str] | None = None,
    series_description: str = "Lesions (l1dfl predict)",
) -> int:
    """An RTSTRUCT with one ROI per lesion (instance k -> ROI k, "Lesion k"), CLOSED_PLANAR contours
    on the PET slices, referencing the PET series (every contour names its PET slice).

    instances_zyx: instance map (0 background, lesions 1..n); reference: the PET grid as a SimpleITK
    image (voxel index -> patient coordinates in mm). Returns the number of ROIs.
    Raises :class:`EmptyPredictionError` when there is no lesion.
    """
    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid

    from nnunetv2_l1dfl import __version__

    _check_headers(instances_zyx, headers)
    n = int(instances_zyx.max()) if instances_zyx.size else 0
    if n == 0:
        raise EmptyPredictionError("no lesion predicted: no RTSTRUCT written")
    names = list(roi_names) if roi_names is not None else [f"Lesion {k}" for k in range(1, n + 1)]
    if len(names) != n:
        raise ValueError(f"{len(names)} ROI names for {n} lesions")
    first = headers[0]
    frame_of_reference = str(first.FrameOfReferenceUID)
    date, time = _now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = generate_uid()
    # Implicit VR: 4-byte value lengths, so a contour of more than 64 kB of ContourData stays DS
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    _copy_patient_study(first, ds)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = frame_of_reference  # Frame of Reference module (dciodvfy checks it)
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = "LESIONS"
    ds.StructureSetName = "l1dfl predict"
    ds.StructureSetDate, ds.StructureSetTime = date, time

    def image_ref(header: pydicom.Dataset) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = header.SOPClassUID
        item.ReferencedSOPInstanceUID = header.SOPInstanceUID
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([image_ref(h) for h in headers])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_SOP_CLASS_UID
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_of_reference
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    # continuous index (x=col, y=row, z=slice) -> patient coordinates: origin + D @ diag(spacing) @ index
    to_mm = np.asarray(reference.GetDirection(), float).reshape(3, 3) @ np.diag(reference.GetSpacing())
    origin = np.asarray(reference.GetOrigin(), float)
    rois, contours_seq, observations = [], [], []
    for k in range(1, n + 1):
        roi = Dataset()
        roi.ROINumber = k
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        roi.ROIName = names[k - 1][:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        items = []
        for slice_index, polygons in lesion_contours(instances_zyx == k).items():
            for polygon in polygons:
                index = np.column_stack([polygon[:, 1], polygon[:, 0], np.full(len(polygon), slice_index, float)])
                points = index @ to_mm.T + origin
                contour = Dataset()
                contour.ContourImageSequence = DicomSequence([image_ref(headers[slice_index])])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                if np.abs(points).max() >= 1e7:
                    raise ValueError(f"contour of lesion {k} lies beyond 1e7 mm: PET geometry is implausible")
                # Built directly as strings of <= 16 characters (DS); pydicom's per-value conversion
                # and validation would dominate the run time on large lesions.
                contour[CONTOUR_DATA_TAG] = DataElement(
                    CONTOUR_DATA_TAG, "DS", [_ds(v) for v in points.ravel()], already_converted=True,
                    validation_mode=pydicom.config.IGNORE,
                )  # fmt: skip
                items.append(contour)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(_ROI_COLOURS[(k - 1) % len(_ROI_COLOURS)])
        roi_contour.ReferencedROINumber = k
        roi_contour.ContourSequence = DicomSequence(items)
        contours_seq.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = k
        observation.ReferencedROINumber = k
        observation.RTROIInterpretedType = ""
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours_seq)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return n


# ----------------------------------------------------------------------------------------------
# Lesion report
# ----------------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if not math.isfinite(value) else round(value, 4)
    if isinstance(value, np.integer):
        return int(value)
    return value


def lesion_rows(
    quantities: LesionQuantities,
    labels_of_lesions: Sequence[int],
    reference: sitk.Image,
    instance_numbers: Sequence[int | None] | None = None,
) -> list[dict[str, Any]]:
    """One dict per lesion (CSV columns): quantities plus centroid and SUVmax position in patient
    coordinates (mm, DICOM LPS as ImagePositionPatient) and the axial slice of the SUVmax voxel
    (0-based z index on the PET grid; the DICOM InstanceNumber of that PET slice for DICOM input)."""
    rows = []
    for i in range(len(quantities.label)):
        cz, cy, cx = (float(v) for v in quantities.centroid_zyx[i])
        mz, my, mx = (int(v) for v in quantities.suvmax_zyx[i])
        centroid = reference.TransformContinuousIndexToPhysicalPoint((cx, cy, cz))
        peak = reference.TransformIndexToPhysicalPoint((mx, my, mz))
        rows.append({
            "lesion_id": int(quantities.label[i]), "label": int(labels_of_lesions[i]),
            "n_voxels": int(quantities.n_voxels[i]), "volume_ml": _finite(quantities.volume_ml[i]),
            "suv_max": _finite(quantities.suv_max[i]), "suv_mean": _finite(quantities.suv_mean[i]),
            "suv_peak": _finite(quantities.suv_peak[i]), "suv_peak_at_max": _finite(quantities.suv_peak_at_max[i]),
            "tlg": _finite(quantities.tlg[i]),
            "centroid_x_mm": _finite(centroid[0]), "centroid_y_mm": _finite(centroid[1]),
            "centroid_z_mm": _finite(centroid[2]),
            "suvmax_x_mm": _finite(peak[0]), "suvmax_y_mm": _finite(peak[1]), "suvmax_z_mm": _finite(peak[2]),
            "suvmax_slice": mz,
            "suvmax_instance_number": instance_numbers[mz] if instance_numbers is not None else None,
        })  # fmt: skip
    return rows


def write_lesion_report(
    rows: Sequence[Mapping[str, Any]], patient: Mapping[str, Any], csv_path: Path, json_path: Path,
    extra: Mapping[str, Any],
) -> None:
    """``lesions.csv``: one row per lesion, then a row ``lesion_id = patient`` with n_lesions, tmtv_ml,
    total_tlg and dmax_mm (lesion rows leave those empty). ``lesions.json``: the same plus ``extra``
    (case, model, input, outputs, definitions)."""
    patient_row = {
        "lesion_id": "patient", "n_lesions": int(patient["n_lesions"]), "tmtv_ml": _finite(patient["tmtv_ml"]),
        "total_tlg": _finite(patient["total_tlg"]), "dmax_mm": _finite(patient["dmax_mm"]),
    }  # fmt: skip
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in [*rows, patient_row]:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS})
    document = {**extra, "patient": {k: v for k, v in patient_row.items() if k != "lesion_id"}, "lesions": list(rows)}
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Coronal MIP
# ----------------------------------------------------------------------------------------------


def write_mip(suv_zyx: np.ndarray, instances_zyx: np.ndarray, reference: sitk.Image, path: Path, title: str,
              vmax_suv: float | None = None) -> None:
    """Coronal maximum-intensity projection of the PET (along y, anterior-posterior), inverted grey
    from SUV 0 to ``vmax_suv`` (default: the 99.5th percentile of the MIP), each lesion outlined in
    red with its number at its projected centroid; head at the top."""
    from nnunetv2_l1dfl.evaluation.plots import _pyplot

    plt = _pyplot()
    spacing_x, _, spacing_z = reference.GetSpacing()
    mip = suv_zyx.max(axis=1)
    vmax = vmax_suv or float(np.percentile(mip, 99.5)) or float(mip.max()) or 1.0
    origin = "lower" if reference.GetDirection()[8] > 0 else "upper"
    height = 6.0
    width = max(2.5, height * mip.shape[1] * spacing_x / max(mip.shape[0] * spacing_z, 1e-6))
    fig, ax = plt.subplots(figsize=(min(width, 12.0), height))
    ax.imshow(mip, cmap="gray_r", vmin=0, vmax=vmax, origin=origin, aspect=spacing_z / spacing_x,
              interpolation="nearest")
    n = int(instances_zyx.max()) if instances_zyx.size else 0
    for k in range(1, n + 1):
        projection = (instances_zyx == k).any(axis=1)
        padded = np.pad(projection, 1).astype(np.uint8)  # closed outlines at the image border too
        ax.contour(np.arange(-1, projection.shape[1] + 1), np.arange(-1, projection.shape[0] + 1), padded,
                   levels=[0.5], colors=["red"], linewidths=0.8)
        zs, xs = np.nonzero(projection)
        ax.text(float(xs.mean()) + 2, float(zs.mean()), str(k), color="red", fontsize=8, fontweight="bold")
    ax.set_title(f"{title}: coronal PET MIP (SUV 0-{vmax:.1f}), {n} lesion(s)", fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
