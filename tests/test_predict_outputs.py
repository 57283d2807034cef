"""The writers of ``l1dfl predict`` on hand-made lesions (no trained model needed).

A small synthetic PET/CT study is written as DICOM (tests/_dicom_factories), read the way
``l1dfl predict`` reads it, and given known label maps: the DICOM SEG read back by highdicom equals
the map voxel for voxel, the RTSTRUCT rasterized by this project's RTSTRUCT reader gives back every
lesion, patient/study/frame-of-reference attributes are the source PET's, empty predictions are
handled as documented, and a batch with a stand-in predictor writes every output atomically.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicom_factories import write_ct_series, write_pet_series
from pydicom.uid import generate_uid

from nnunetv2_l1dfl.conversion.masks import rasterize_rtstruct
from nnunetv2_l1dfl.evaluation.metrics import label_lesions
from nnunetv2_l1dfl.evaluation.quantities import lesion_quantities
from nnunetv2_l1dfl.predict import outputs
from nnunetv2_l1dfl.predict.inputs import StudyError, discover_studies, load_study
from nnunetv2_l1dfl.predict.model import ModelSpec
from nnunetv2_l1dfl.predict.runner import PredictOptions, run_batch

SHAPE = (12, 20, 24)  # z, y, x
ORIENTATIONS = {"axial": (1, 0, 0, 0, 1, 0), "rows_flipped": (1, 0, 0, 0, -1, 0)}


def write_study(folder: Path, orientation=(1, 0, 0, 0, 1, 0), patient_id: str = "PAT-SECRET-42", **pet_kwargs) -> Path:
    study_uid, frame = generate_uid(), generate_uid()
    volume = np.full(SHAPE, 2000.0)
    volume[4:8, 6:12, 8:14] = 20000.0
    common = dict(patient_id=patient_id, patient_name="DOE^JANE", study_uid=study_uid,
                  frame_of_reference_uid=frame, orientation=orientation)  # fmt: skip
    write_pet_series(folder / "PET", volume, spacing=(4.0, 4.0, 3.0), origin=(-40.0, -30.0, 100.0), **common,
                     **pet_kwargs)  # fmt: skip
    write_ct_series(folder / "CT", np.zeros((18, 40, 48)), spacing=(2.0, 2.0, 2.0), origin=(-42.0, -32.0, 99.0),
                    **common)  # fmt: skip
    return folder


@pytest.fixture(scope="module", params=sorted(ORIENTATIONS))
def loaded(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"study_{request.param}")
    write_study(root / "dicom", ORIENTATIONS[request.param])
    discovery = discover_studies(root / "dicom")
    assert discovery.kind == "dicom" and len(discovery.studies) == 1 and not discovery.failed
    return load_study(discovery.studies[0], root / "work")


def hand_made_labels() -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[3:7, 5:11, 6:12] = 1
    label[5, 8, 9] = 0  # a hole inside lesion 1
    label[9:11, 14:18, 15:22] = 2  # a second lesion with another label
    label[0, 0, 0:2] = 1  # a lesion at the image border
    label[11, 19, 23] = 1  # a one-voxel lesion in the opposite corner
    return label


def test_pet_headers_follow_the_grid(loaded):
    assert len(loaded.pet_headers) == SHAPE[0]
    for k, header in enumerate(loaded.pet_headers):
        index = loaded.suv.TransformPhysicalPointToIndex([float(v) for v in header.ImagePositionPatient])
        assert index == (0, 0, k)


def test_seg_reads_back_voxel_for_voxel_with_coded_segments(loaded, tmp_path):
    import highdicom as hd

    label = hand_made_labels()
    path = tmp_path / "seg.dcm"
    written = outputs.write_dicom_seg(label, loaded.pet_headers, path, {1: "lesion", 2: "node"}, "model", "1.0")
    assert written == [1, 2]
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path))
    assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == 2
    for item, name in zip(seg.SegmentSequence, ("lesion", "node")):
        assert item.SegmentLabel == name and item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SCT Neoplasm
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in loaded.pet_headers], combine_segments=True
    )
    assert np.array_equal(np.asarray(pixels), label)
    first = loaded.pet_headers[0]
    for keyword in ("PatientID", "PatientName", "PatientSex", "StudyInstanceUID", "StudyID", "FrameOfReferenceUID"):
        assert str(seg.get(keyword)) == str(first.get(keyword)), keyword
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID

    # Only the labels present become segments: label 2 alone is segment 1, named after its label.
    only_nodes = np.where(label == 2, 2, 0).astype(np.uint8)
    assert outputs.write_dicom_seg(only_nodes, loaded.pet_headers, path, {1: "lesion", 2: "node"}, "m", "1") == [2]
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["node"]


def test_rtstruct_rasterizes_back_to_every_lesion(loaded, tmp_path):
    instances, n = label_lesions(hand_made_labels() > 0, connectivity=18)
    assert n == 4
    path = tmp_path / "rtstruct.dcm"
    assert outputs.write_rtstruct(instances, loaded.pet_headers, loaded.suv, path) == 4
    ds = pydicom.dcmread(path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Lesion 1", "Lesion 2", "Lesion 3", "Lesion 4"]
    first = loaded.pet_headers[0]
    frame_ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame_ref.FrameOfReferenceUID == first.FrameOfReferenceUID
    series_ref = frame_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == first.SeriesInstanceUID
    pet_uids = {h.SOPInstanceUID for h in loaded.pet_headers}
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID in pet_uids
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate"):
        assert str(ds.get(keyword)) == str(first.get(keyword)), keyword
    for k in range(1, n + 1):
        image, rois = rasterize_rtstruct(path, loaded.suv, roi_pattern=f"^Lesion {k}$")
        got, want = sitk.GetArrayFromImage(image) > 0, instances == k
        assert rois == [f"Lesion {k}"]
        assert 2 * (got & want).sum() / (got.sum() + want.sum()) >= 0.95
        assert np.array_equal(got, want)  # marching squares at 0.5 give the voxels back exactly


def test_empty_prediction_writes_no_dicom_object(loaded, tmp_path):
    empty = np.zeros(SHAPE, dtype=np.uint8)
    with pytest.raises(outputs.EmptyPredictionError, match="no lesion"):
        outputs.write_dicom_seg(empty, loaded.pet_headers, tmp_path / "seg.dcm", {1: "lesion"}, "m", "1")
    with pytest.raises(outputs.EmptyPredictionError, match="no lesion"):
        outputs.write_rtstruct(empty, loaded.pet_headers, loaded.suv, tmp_path / "rtstruct.dcm")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_dciodvfy_finds_no_errors(loaded, tmp_path):
    label = hand_made_labels()
    instances, _ = label_lesions(label > 0)
    outputs.write_dicom_seg(label, loaded.pet_headers, tmp_path / "seg.dcm", {1: "lesion", 2: "node"}, "m", "1")
    outputs.write_rtstruct(instances, loaded.pet_headers, loaded.suv, tmp_path / "rtstruct.dcm")
    for name in ("seg.dcm", "rtstruct.dcm"):
        result = subprocess.run(["dciodvfy", str(tmp_path / name)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (name, errors)


def test_lesion_rows_give_positions_in_patient_millimetres(loaded):
    instances, n = label_lesions(hand_made_labels() > 0)
    suv = sitk.GetArrayFromImage(loaded.suv)
    spacing_zyx = loaded.suv.GetSpacing()[::-1]
    q = lesion_quantities(instances, suv, spacing_zyx)
    rows = outputs.lesion_rows(q, [1] * n, loaded.suv, [int(h.InstanceNumber) for h in loaded.pet_headers])
    direction = np.asarray(loaded.suv.GetDirection()).reshape(3, 3)
    to_mm = direction @ np.diag(loaded.suv.GetSpacing())
    origin = np.asarray(loaded.suv.GetOrigin())
    for row, k in zip(rows, range(1, n + 1)):
        zyx = np.argwhere(instances == k).mean(axis=0)
        expected = origin + to_mm @ zyx[::-1]
        got = [row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]]
        assert np.allclose(got, expected, atol=1e-3)
        mz = row["suvmax_slice"]
        assert row["suvmax_instance_number"] == int(loaded.pet_headers[mz].InstanceNumber)
        assert row["suvmax_z_mm"] == pytest.approx(float(loaded.pet_headers[mz].ImagePositionPatient[2]), abs=1e-3)


# ----------------------------------------------------------------------------------------------
# The batch with a stand-in predictor (nnU-Net's reader/writer, a fixed label map)
# ----------------------------------------------------------------------------------------------


class FixedPredictor:
    """Quacks like nnUNetPredictor for the runner: nnU-Net's SimpleITK reader, a fixed label map."""

    use_mirroring = False

    def __init__(self, label: np.ndarray):
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        self.label = label
        self.plans_manager = SimpleNamespace(image_reader_writer_class=SimpleITKIO)

    def predict_single_npy_array(self, image, properties, previous, output, return_probabilities):
        assert image.shape == (2, *self.label.shape) and image.dtype == np.float32
        if return_probabilities:
            return self.label.copy(), np.stack([self.label == 0, self.label == 1]).astype(np.float32)
        return self.label.copy()


def spec(tmp_path: Path) -> ModelSpec:
    return ModelSpec(folder=tmp_path, folds=(0,), checkpoint="checkpoint_final.pth", trainer="nnUNetTrainerL1DFL",
                     plans="nnUNetPlans", configuration="3d_fullres", dataset_name="Dataset999_Test",
                     labels={"background": 0, "lesion": 1}, file_ending=".nii.gz")  # fmt: skip


def test_batch_writes_everything_reports_failures_and_keeps_patient_ids_off_the_console(tmp_path, caplog, capsys):
    import logging

    write_study(tmp_path / "in" / "good")
    write_study(tmp_path / "in" / "no_weight", omit=("PatientWeight",))
    discovery = discover_studies(tmp_path / "in")
    assert len(discovery.studies) == 2
    label = (hand_made_labels() > 0).astype(np.uint8)
    out = tmp_path / "out"
    out.mkdir()
    caplog.set_level(logging.DEBUG)
    summary = run_batch(discovery.studies, lambda: FixedPredictor(label), spec(tmp_path), out,
                        PredictOptions(save_probabilities=True, num_workers=2), progress=False)  # fmt: skip
    assert len(summary.done) == 1 and len(summary.failed) == 1
    (failed_case, reason), = summary.failed.items()
    assert "PatientWeight" in reason and failed_case in reason
    assert not (out / failed_case).exists()
    case = out / summary.done[0]
    assert sorted(p.name for p in case.iterdir()) == sorted(
        ["seg.dcm", "rtstruct.dcm", "prediction.nii.gz", "lesions.nii.gz", "probabilities.npz", "lesions.csv",
         "lesions.json", "mip.png"])  # fmt: skip
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    report = json.loads((case / "lesions.json").read_text())
    assert report["patient"]["n_lesions"] == 4 == len(report["lesions"])
    csv_lines = (case / "lesions.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 + 1 and csv_lines[-1].startswith("patient,")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(case / "prediction.nii.gz"))), label)
    console = caplog.text + capsys.readouterr().out + " ".join(summary.failed.values())
    assert "PAT-SECRET-42" not in console and "DOE" not in console
    assert pydicom.dcmread(case / "seg.dcm").PatientID == "PAT-SECRET-42"

    # Empty prediction: no SEG/RTSTRUCT, said so in lesions.json; the report has only the patient row.
    empty_out = tmp_path / "empty"
    empty_out.mkdir()
    good = [s for s in discovery.studies if s.case_id == summary.done[0]]
    summary = run_batch(good, lambda: FixedPredictor(np.zeros_like(label)), spec(tmp_path), empty_out,
                        PredictOptions(), progress=False)  # fmt: skip
    case = empty_out / summary.done[0]
    report = json.loads((case / "lesions.json").read_text())
    assert report["outputs"]["seg.dcm"] == "not written: no lesion predicted" == report["outputs"]["rtstruct.dcm"]
    assert not (case / "seg.dcm").exists() and report["patient"]["n_lesions"] == 0 and report["lesions"] == []
    assert report["patient"]["tmtv_ml"] == 0 and report["patient"]["dmax_mm"] is None


def test_interrupted_study_leaves_nothing_and_is_redone(tmp_path):
    write_study(tmp_path / "in" / "a")
    studies = discover_studies(tmp_path / "in").studies
    out = tmp_path / "out"
    out.mkdir()

    class Exploding(FixedPredictor):
        def predict_single_npy_array(self, *args, **kwargs):
            raise MemoryError("out of memory while predicting")

    label = (hand_made_labels() > 0).astype(np.uint8)
    summary = run_batch(studies, lambda: Exploding(label), spec(tmp_path), out, PredictOptions(), progress=False)
    assert list(summary.failed.values()) == [f"case {studies[0].case_id}: MemoryError: out of memory while predicting"]
    assert not list(out.iterdir())
    summary = run_batch(studies, lambda: FixedPredictor(label), spec(tmp_path), out, PredictOptions(), progress=False)
    assert summary.done == [studies[0].case_id]
    summary = run_batch(studies, lambda: FixedPredictor(label), spec(tmp_path), out, PredictOptions(), progress=False)
    assert summary.skipped == [studies[0].case_id] and not summary.done


def test_nifti_input_layout_and_missing_pet(tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    image = sitk.GetImageFromArray(np.zeros(SHAPE, np.float32))
    for name in ("a_0000", "a_0001", "b_0000"):
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    discovery = discover_studies(folder)
    assert discovery.kind == "nifti" and [s.case_id for s in discovery.studies] == ["a"]
    assert "no PET channel b_0001" in discovery.failed["b"]


def test_nifti_input_truncated_or_nan_pet_is_refused(tmp_path):
    """SimpleITK zero-fills a truncated .nii.gz and reads NaN as 0: predict must refuse both, naming the file."""
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random(SHAPE).astype(np.float32))
    for name in ("a_0000", "a_0001", "b_0000", "b_0001"):
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    data = (folder / "a_0001.nii.gz").read_bytes()
    (folder / "a_0001.nii.gz").write_bytes(data[: len(data) // 2])
    nan = sitk.GetArrayFromImage(image)
    nan[3, 4, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(folder / "b_0001.nii.gz"))
    studies = {s.case_id: s for s in discover_studies(folder).studies}
    for case in ("a", "b"):
        with pytest.raises(StudyError, match=f"{case}_0001.nii.gz"):
            load_study(studies[case], tmp_path / "work")


def test_rtstruct_with_a_contour_beyond_64_kilobytes_stays_ds_and_reads_back(loaded, tmp_path):
    """A comb-shaped lesion gives one contour of thousands of vertices (> 64 kB of ContourData, the
    limit of explicit VR): the file is implicit VR, ContourData stays DS, the lesion reads back whole."""
    import copy

    from nnunetv2_l1dfl.conversion.dicom_series import FRAME_OF_REFERENCE_KEY

    rows, cols = 12, 3000
    headers = [copy.deepcopy(h) for h in loaded.pet_headers[:2]]
    for h in headers:
        h.Rows, h.Columns = rows, cols
    reference = sitk.Image((cols, rows, 2), sitk.sitkFloat32)
    reference.SetSpacing((1.0, 1.0, 3.0))
    reference.SetOrigin([float(v) for v in headers[0].ImagePositionPatient])
    reference.SetMetaData(FRAME_OF_REFERENCE_KEY, str(headers[0].FrameOfReferenceUID))
    for k, h in enumerate(headers):
        h.ImagePositionPatient = list(reference.TransformIndexToPhysicalPoint((0, 0, k)))
        h.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        h.PixelSpacing = [1, 1]
    instances = np.zeros((2, rows, cols), dtype=np.uint16)
    instances[0, 2:6, 1:-1] = 1
    instances[0, 6:10, 1:-1:2] = 1  # teeth one voxel wide, one apart
    path = tmp_path / "rtstruct.dcm"
    outputs.write_rtstruct(instances, headers, reference, path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    assert len(contour.ContourData) * 8 > 65536 and contour.NumberOfContourPoints * 3 == len(contour.ContourData)
    image, _ = rasterize_rtstruct(path, reference, roi_pattern="^Lesion 1$")
    assert np.array_equal(sitk.GetArrayFromImage(image) > 0, instances == 1)


def test_rtstruct_can_reference_the_ct_and_rasterizes_back_on_the_ct_grid(tmp_path):
    """--rtstruct-reference ct: contours on the CT slices, every one naming a CT instance, and the ROIs
    rasterized back on the CT grid equal the prediction taken onto the CT by nearest neighbour."""
    from nnunetv2_l1dfl.conversion.dicom_series import read_ct_hu

    write_study(tmp_path / "in" / "a")
    discovery = discover_studies(tmp_path / "in")
    label = (hand_made_labels() > 0).astype(np.uint8)
    label[0, 0, 0:2] = 0  # keep the test to the two lesions inside both grids
    label[11, 19, 23] = 0
    out = tmp_path / "out"
    out.mkdir()
    summary = run_batch(discovery.studies, lambda: FixedPredictor(label), spec(tmp_path), out,
                        PredictOptions(rtstruct_reference="ct"), progress=False)  # fmt: skip
    assert len(summary.done) == 1, summary.failed
    case = out / summary.done[0]
    report = json.loads((case / "lesions.json").read_text())
    assert report["outputs"]["rtstruct.dcm"] == "written", report["outputs"]
    ds = pydicom.dcmread(case / "rtstruct.dcm")
    ct_files = sorted((tmp_path / "in" / "a" / "CT").iterdir())
    ct_headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_files]
    ct_uids = {h.SOPInstanceUID for h in ct_headers}
    series_ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == ct_headers[0].SeriesInstanceUID
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID in ct_uids
    ct = read_ct_hu(ct_files)
    instances = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lesions.nii.gz")))
    instance_image = sitk.GetImageFromArray(instances.astype(np.uint32))
    instance_image.CopyInformation(sitk.ReadImage(str(case / "prediction.nii.gz")))
    on_ct = sitk.GetArrayFromImage(sitk.Resample(instance_image, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    n = int(instances.max())
    assert n == 2 and [r.ROIName for r in ds.StructureSetROISequence] == ["Lesion 1", "Lesion 2"]
    for k in range(1, n + 1):
        image, _ = rasterize_rtstruct(case / "rtstruct.dcm", ct, roi_pattern=f"^Lesion {k}$")
        got = sitk.GetArrayFromImage(image) > 0
        assert got.any() and np.array_equal(got, on_ct == k)

    # A lesion with no CT voxel (outside the CT's field of view): nothing written, the lesion named.
    from nnunetv2_l1dfl.predict.runner import _write_rtstruct_on_ct

    pet_grid = sitk.ReadImage(str(case / "prediction.nii.gz"))
    small_ct = sitk.Image(10, 10, 4, sitk.sitkInt16)
    small_ct.SetSpacing((2.0, 2.0, 2.0))
    small_ct.SetOrigin((-42.0, -32.0, 99.0))  # covers x, y < -22 mm and z < 106 mm only
    outside = np.zeros(SHAPE, dtype=np.uint8)
    outside[0, 0, 0] = 1  # x -40, y -30, z 100: inside the small CT
    outside[10, 15, 20] = 2  # z 130 mm: above it
    loaded_small = SimpleNamespace(suv=pet_grid, ct=small_ct, study=SimpleNamespace(ct_files=()))
    assert _write_rtstruct_on_ct(outside, 2, loaded_small, "c", tmp_path / "x.dcm") == [2]
    assert not (tmp_path / "x.dcm").exists()
