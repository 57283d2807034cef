"""Write a rendered phantom study as DICOM: PET (Bq/ml), CT (HU), and RTSTRUCT or DICOM SEG lesions.

What the files contain, so they exercise the same code path as a clinical export:

- PET Image Storage, one file per slice, ``Units`` BQML, ``DecayCorrection`` START (activity
  decay-corrected to the series start, ``SeriesTime``), signed 16-bit pixels with a per-slice
  ``RescaleSlope`` (each slice uses its full range), ``PatientWeight``, and the radiopharmaceutical
  sequence: F-18 (``RadionuclideHalfLife`` 6586.2 s), ``RadionuclideTotalDose`` in Bq,
  ``RadiopharmaceuticalStartTime`` and ``...StartDateTime`` about 120 min before the series. Bed
  positions of 160 mm are acquired one after the other from the feet up, so ``AcquisitionTime``
  varies per bed, as on multi-bed scanners (it is not the SUV reference time), with
  ``FrameReferenceTime``, ``ActualFrameDuration`` and ``DecayFactor`` per slice.
- CT Image Storage on a finer grid with a wider field of view, unsigned 12-bit pixels with
  ``RescaleIntercept`` -1024, same FrameOfReferenceUID.
- RTSTRUCT referencing the PET series: one ROI per lesion named ``Lesion_<n>_<site>`` (GTV) and
  organ ROIs (``Bladder``, ``Kidney_L``, ...; ORGAN, never named "lesion"). Contours follow the
  voxel edges of the masks on the PET slices, so rasterizing them (voxel centre in polygon, holes
  by even-odd) gives the masks back exactly.
- or DICOM SEG (highdicom, BINARY, one segment per lesion, empty frames omitted) on the PET series.

UIDs are derived from the seed (pydicom ``generate_uid`` with entropy sources) and no current
date or time is written, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_l1dfl import __version__

if TYPE_CHECKING:
    import pydicom

    from nnunetv2_l1dfl.phantom.cohort import StudySpec
    from nnunetv2_l1dfl.phantom.render import RenderedStudy

PET_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.128"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # conventional RTReferencedStudy class

MANUFACTURER = "nnunetv2-l1dfl"
MODEL = "synthetic PSMA PET/CT phantom"
BED_LENGTH_MM = 160.0
BED_DURATION_S = 150
F18_POSITRON_FRACTION = 0.9673


def make_uid(*parts: object) -> str:
    """A deterministic DICOM UID from ``parts`` (seed, patient, study, object...)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["nnunetv2_l1dfl.phantom", *(str(p) for p in parts)])


def ds_number(value: float, decimals: int = 6) -> str:
    """A DS string (at most 16 characters) for ``value``; readers get exactly ``float(result)``."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(round(value, decimals)))


def _date(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _time(t: dt.datetime) -> str:
    return t.strftime("%H%M%S")


class StudyUIDs:
    """The UIDs of one study's objects, derived from the cohort seed and the study's indices."""

    def __init__(self, spec: StudySpec):
        key = spec.render_entropy
        self.study = make_uid(*key, "study")
        self.frame_of_reference = make_uid(*key, "frame-of-reference")
        self.pet_series = make_uid(*key, "pet-series")
        self.ct_series = make_uid(*key, "ct-series")
        self.mask_series = make_uid(*key, "mask-series")
        self.mask_instance = make_uid(*key, "mask-instance")
        self._key = key

    def pet_instance(self, k: int) -> str:
        return make_uid(*self._key, "pet", k)

    def ct_instance(self, k: int) -> str:
        return make_uid(*self._key, "ct", k)


def _save(ds: pydicom.Dataset, path: Path) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def _common(spec: StudySpec, uids: StudyUIDs, modality: str, sop_class: str, sop_instance: str,
            series_uid: str, series_number: int, description: str, when: dt.datetime) -> pydicom.Dataset:
    """Patient, study, series, equipment and SOP common attributes shared by every object."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate = _date(when)
    ds.InstanceCreationTime = _time(when)
    study_time = spec.injection_datetime - dt.timedelta(minutes=10)
    ds.StudyDate = _date(study_time)
    ds.StudyTime = _time(study_time)
    ds.SeriesDate = _date(when)
    ds.SeriesTime = _time(when)
    ds.AccessionNumber = f"PH{spec.render_entropy[0] % 10000:04d}{spec.ordinal:05d}"
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = "0001"
    ds.InstitutionName = "Synthetic Phantom Hospital"
    ds.StationName = "PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PSMA PET/CT (synthetic phantom)"
    ds.SeriesDescription = description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = _date(spec.birth_date)
    ds.PatientSex = "M"
    ds.PatientAge = f"{spec.age_years:03d}Y"
    ds.PatientSize = ds_number(spec.height_m, 2)
    ds.PatientWeight = ds_number(spec.weight_kg, 1)
    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{spec.study_index + 1}"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    return ds


def _image_plane(ds: pydicom.Dataset, grid_spacing: Sequence[float], origin_xy: Sequence[float], z: float,
                 rows: int, cols: int) -> None:
    sx, sy, sz = grid_spacing
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = [ds_number(origin_xy[0], 4), ds_number(origin_xy[1], 4), ds_number(z, 4)]
    ds.SliceLocation = ds_number(z, 4)
    ds.PixelSpacing = [ds_number(sy, 4), ds_number(sx, 4)]  # row spacing (y), column spacing (x)
    ds.SliceThickness = ds_number(sz, 4)
    ds.PatientPosition = "FFS"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"


def write_pet_series(spec: StudySpec, rendered: RenderedStudy, uids: StudyUIDs, folder: Path) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Write the PET slices; returns their datasets (ascending z) and the SUVbw a reader decodes.

    The returned SUV (float64 [z, y, x]) is ``stored integer x RescaleSlope x SUV scale``, i.e. the
    ground truth after 16-bit quantization, using the DS strings exactly as written.
    """
    grid = rendered.pet_grid
    nz, ny, nx = grid.shape
    suv_scale = spec.suv_scale_g_per_bq()
    activity = rendered.pet_suv.astype(np.float64) / suv_scale  # Bq/ml
    decay_constant = math.log(2.0) / spec.half_life_s
    x = decay_constant * BED_DURATION_S
    frame_factor = x / (1.0 - math.exp(-x))
    avg_count_s = math.log(frame_factor) / decay_constant

    folder.mkdir(parents=True, exist_ok=True)
    datasets, decoded = [], np.zeros(grid.shape, dtype=np.float64)
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    for k in range(nz):
        z = grid.origin_mm[2] + k * grid.spacing_mm[2]
        bed = int((z - grid.origin_mm[2]) // BED_LENGTH_MM)
        acq_start = spec.series_datetime + dt.timedelta(seconds=bed * BED_DURATION_S)
        instance_number = nz - k  # instance 1 is the most superior slice
        ds = _common(spec, uids, "PT", PET_SOP_CLASS, uids.pet_instance(k), uids.pet_series, 2,
                     "PET WB PSMA (synthetic, Bq/ml)", spec.series_datetime)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.AcquisitionDate = _date(acq_start)
        ds.AcquisitionTime = _time(acq_start)
        ds.ContentDate = _date(spec.series_datetime)
        ds.ContentTime = _time(spec.series_datetime)
        ds.InstanceNumber = instance_number
        ds.ImageIndex = instance_number
        ds.BodyPartExamined = "WHOLEBODY"
        _image_plane(ds, grid.spacing_mm, grid.origin_mm[:2], z, ny, nx)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

        # Per-slice rescale: the slice maximum maps to 32767.
        slice_max = float(activity[k].max())
        slope_text = ds_number(slice_max / 32767.0 if slice_max > 0 else 1.0, 10)
        slope = float(slope_text)
        stored = np.clip(np.round(activity[k] / slope), -32768, 32767).astype(np.int16)
        decoded[k] = stored.astype(np.float64) * slope * suv_scale
        ds.RescaleSlope = slope_text
        ds.RescaleIntercept = "0"
        ds.PixelData = stored.tobytes()

        # PET Series / PET Isotope / PET Image modules.
        ds.SeriesType = ["WHOLE BODY", "IMAGE"]
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
        ds.DecayCorrection = "START"
        ds.RandomsCorrectionMethod = "DLYD"
        ds.AttenuationCorrectionMethod = "CT-based"
        ds.ScatterCorrectionMethod = "model-based"
        ds.ReconstructionMethod = "OSEM 3i21s"
        ds.CollimatorType = "NONE"
        ds.NumberOfSlices = nz
        ds.FrameReferenceTime = ds_number((bed * BED_DURATION_S + avg_count_s) * 1000.0, 1)
        ds.ActualFrameDuration = BED_DURATION_S * 1000
        ds.DecayFactor = ds_number(math.exp(decay_constant * bed * BED_DURATION_S) * frame_factor, 6)
        ds.SliceSensitivityFactor = "1"
        ds.PatientOrientationCodeSequence = DicomSequence()
        ds.PatientGantryRelationshipCodeSequence = DicomSequence()

        nuclide = Dataset()
        nuclide.CodeValue, nuclide.CodingSchemeDesignator, nuclide.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
        rp = Dataset()
        rp.Radiopharmaceutical = spec.tracer
        rp.RadiopharmaceuticalStartTime = _time(spec.injection_datetime)
        rp.RadiopharmaceuticalStartDateTime = spec.injection_datetime.strftime("%Y%m%d%H%M%S")
        rp.RadionuclideTotalDose = ds_number(spec.injected_dose_bq, 0)
        rp.RadionuclideHalfLife = ds_number(spec.half_life_s, 3)
        rp.RadionuclidePositronFraction = ds_number(F18_POSITRON_FRACTION, 4)
        rp.RadionuclideCodeSequence = DicomSequence([nuclide])
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([rp])

        _save(ds, folder / f"PT_{instance_number:04d}.dcm")
        datasets.append(ds)
    return datasets, decoded


def write_ct_series(spec: StudySpec, rendered: RenderedStudy, uids: StudyUIDs, folder: Path) -> list[pydicom.Dataset]:
    """Write the CT slices (HU + 1024 as unsigned 12-bit, RescaleIntercept -1024); returns them (ascending z)."""
    grid = rendered.ct_grid
    nz, ny, nx = grid.shape
    ct_time = spec.series_datetime - dt.timedelta(minutes=4)
    folder.mkdir(parents=True, exist_ok=True)
    datasets = []
    for k in range(nz):
        z = grid.origin_mm[2] + k * grid.spacing_mm[2]
        instance_number = nz - k
        ds = _common(spec, uids, "CT", CT_SOP_CLASS, uids.ct_instance(k), uids.ct_series, 1,
                     "CT WB low dose (synthetic)", ct_time)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionDate = _date(ct_time)
        ds.AcquisitionTime = _time(ct_time)
        ds.ContentDate = _date(ct_time)
        ds.ContentTime = _time(ct_time)
        ds.InstanceNumber = instance_number
        ds.AcquisitionNumber = 1
        ds.BodyPartExamined = "WHOLEBODY"
        ds.KVP = "120"
        ds.XRayTubeCurrent = 60
        ds.ReconstructionDiameter = ds_number(nx * grid.spacing_mm[0], 2)
        ds.ConvolutionKernel = "B30f"
        _image_plane(ds, grid.spacing_mm, grid.origin_mm[:2], z, ny, nx)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        stored = np.clip(rendered.ct_hu[k].astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        _save(ds, folder / f"CT_{instance_number:04d}.dcm")
        datasets.append(ds)
    return datasets


# --------------------------------------------------------------------------------------------------
# Contours
# --------------------------------------------------------------------------------------------------
def trace_pixel_boundaries(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons along the pixel edges of a 2D mask [row, col].

    Returns a list of (N, 2) float arrays of polygon vertices in continuous index coordinates
    (row, col), where pixel (r, c) is the unit square centred on (r, c); collinear vertices are
    dropped. Outer boundaries and hole boundaries are separate polygons, so even-odd filling
    (XOR) restores the mask exactly; pixels touching only at a corner get separate polygons.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    r, c = np.nonzero(m)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(starts_r, starts_c, ends_r, ends_c):
        for a, b, e, f in zip(starts_r.tolist(), starts_c.tolist(), ends_r.tolist(), ends_c.tolist()):
            out.setdefault((a, b), []).append((e, f))

    # Corner (R, C) is the top-left corner of pixel (R, C). Clockwise on screen (rows down).
    sel = ~m[r - 1, c]
    add(r[sel], c[sel], r[sel], c[sel] + 1)  # top edge, left to right
    sel = ~m[r, c + 1]
    add(r[sel], c[sel] + 1, r[sel] + 1, c[sel] + 1)  # right edge, downwards
    sel = ~m[r + 1, c]
    add(r[sel] + 1, c[sel] + 1, r[sel] + 1, c[sel])  # bottom edge, right to left
    sel = ~m[r, c - 1]
    add(r[sel] + 1, c[sel], r[sel], c[sel])  # left edge, upwards

    polygons = []
    while out:
        start = next(iter(out))
        loop = [start]
        current, previous = start, None
        while True:
            options = out[current]
            if previous is not None and len(options) > 1:
                din = (current[1] - previous[1], current[0] - previous[0])  # (dx, dy)
                options.sort(key=lambda e: din[0] * (e[0] - current[0]) - din[1] * (e[1] - current[1]), reverse=True)
            nxt = options.pop(0)
            if not options:
                del out[current]
            previous, current = current, nxt
            if current == start:
                break
            loop.append(current)
        pts = np.asarray(loop, dtype=np.float64)
        # Drop collinear vertices.
        prev_d = pts - np.roll(pts, 1, axis=0)
        next_d = np.roll(pts, -1, axis=0) - pts
        keep = np.abs(prev_d[:, 0] * next_d[:, 1] - prev_d[:, 1] * next_d[:, 0]) > 0
        pts = pts[keep]
        polygons.append(pts - 1.0 - 0.5)  # undo padding; corners sit half a pixel off the centres
    return polygons


def write_rtstruct(spec: StudySpec, rendered: RenderedStudy, uids: StudyUIDs, pet_datasets: Sequence[pydicom.Dataset],
                   path: Path) -> list[dict]:
    """Write the RTSTRUCT (lesions + organs, contours on the PET slices); returns its ROI table."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    grid = rendered.pet_grid
    when = spec.series_datetime + dt.timedelta(days=1)
    ds = _common(spec, uids, "RTSTRUCT", RTSTRUCT_SOP_CLASS, uids.mask_instance, uids.mask_series, 3,
                 "Lesion contours (synthetic)", when)
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "PSMA lesions"
    ds.StructureSetName = "PHANTOM"
    ds.StructureSetDate = _date(when)
    ds.StructureSetTime = _time(when)
    ds.ApprovalStatus = "UNAPPROVED"

    def image_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = PET_SOP_CLASS
        item.ReferencedSOPInstanceUID = pet_datasets[k].SOPInstanceUID
        return item

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = uids.pet_series
    series_ref.ContourImageSequence = DicomSequence([image_ref(k) for k in range(len(pet_datasets))])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = uids.study
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = uids.frame_of_reference
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    rois = []
    for i, placed in enumerate(rendered.lesions, start=1):
        rois.append((f"Lesion_{i}_{placed.site}", rendered.lesion_labels == i, "GTV", [255, 0, 0]))
    for name, mask in rendered.organ_masks.items():
        rois.append((name, mask, "ORGAN", [0, 160, 255]))

    roi_seq, contour_seq, obs_seq, table = DicomSequence(), DicomSequence(), DicomSequence(), []
    for number, (name, mask, kind, color) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = uids.frame_of_reference
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "SEMIAUTOMATIC"
        roi_seq.append(roi)
        contours = DicomSequence()
        for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
            z = grid.origin_mm[2] + k * grid.spacing_mm[2]
            for polygon in trace_pixel_boundaries(mask[k]):
                xs = grid.origin_mm[0] + polygon[:, 1] * grid.spacing_mm[0]
                ys = grid.origin_mm[1] + polygon[:, 0] * grid.spacing_mm[1]
                contour = Dataset()
                contour.ContourImageSequence = DicomSequence([image_ref(int(k))])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(polygon)
                contour.ContourData = [ds_number(v, 4) for xyz in zip(xs, ys, np.full(len(xs), z)) for v in xyz]
                contours.append(contour)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = color
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = contours
        contour_seq.append(roi_contour)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = kind
        obs.ROIInterpreter = ""
        obs_seq.append(obs)
        table.append({"roi_number": number, "roi_name": name, "type": kind, "voxels": int(mask.sum())})
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(ds, path)
    return table


def write_seg(spec: StudySpec, rendered: RenderedStudy, uids: StudyUIDs, pet_datasets: Sequence[pydicom.Dataset],
              path: Path) -> list[dict]:
    """Write a BINARY DICOM SEG with one segment per lesion on the PET series (highdicom)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=f"Lesion {i} ({placed.site.replace('_', ' ')})",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, placed in enumerate(rendered.lesions, start=1)
    ]
    when = spec.series_datetime + dt.timedelta(days=1)
    seg = hd.seg.Segmentation(
        source_images=list(pet_datasets),
        pixel_array=rendered.lesion_labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.mask_series,
        series_number=3,
        sop_instance_uid=uids.mask_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL,
        software_versions=__version__,
        device_serial_number="0001",
        content_description="PSMA lesions (synthetic)",
        content_label="LESIONS",
        content_date=when.date(),
        content_time=when.time(),
        series_description="Lesion segmentation (synthetic)",
    )
    # highdicom stamps the current time and draws a fresh dimension organization UID; keep files
    # reproducible (the same seed gives the same bytes).
    seg.InstanceCreationDate = _date(when)
    seg.InstanceCreationTime = _time(when)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{_date(when)}{_time(when)}"
    dimension_uid = make_uid(uids.mask_instance, "dimension-organization")
    for sequence in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(sequence, []):
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = dimension_uid
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return [{"segment_number": i, "segment_label": d.SegmentLabel, "type": "lesion",
             "voxels": int((rendered.lesion_labels == i).sum())} for i, d in enumerate(descriptions, start=1)]
