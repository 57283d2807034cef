"""The embedded synthetic PSMA PET/CT cohort (``l1dfl phantom``): truth, DICOM, and the converter on it.

One small cohort (6 studies of 44 x 44 x 36 PET voxels) is generated per session and shared.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from matplotlib.path import Path as PolygonPath
from scipy.ndimage import binary_dilation

from nnunetv2_l1dfl.cli import main as l1dfl_main
from nnunetv2_l1dfl.phantom.cohort import (
    LESION_SUV_MAX_RANGE,
    PAPER_LESION_SUV_MAX,
    PAPER_LESION_VOLUME_ML,
    SIZE_PRESETS,
    plan_cohort,
    sample_lesion_suv_max,
    sample_lesion_volumes_ml,
    study_layout,
)
from nnunetv2_l1dfl.phantom.dicom_writer import trace_pixel_boundaries
from nnunetv2_l1dfl.phantom.generate import load_cohort, load_truth

N_STUDIES = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    assert l1dfl_main(["phantom", str(out), "--cases", str(N_STUDIES), "--size", "small", "--seed", "3"]) == 0
    return out


def _truths(cohort: Path) -> list[dict]:
    return [load_truth(cohort, s["study_folder"]) for s in load_cohort(cohort)["studies"]]


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ------------------------------------------------------------------------------------------------ cohort
def test_cohort_layout_counts_and_formats(cohort):
    index = load_cohort(cohort)
    assert index["complete"] and index["parameters"] == {"n_cases": N_STUDIES, "seed": 3, "size": "small",
                                                         "generator_version": 1}
    truths = _truths(cohort)
    counts = [t["n_lesions"] for t in truths]
    assert len(truths) == N_STUDIES and all(1 <= n <= 5 for n in counts)
    assert 1 in counts and any(n > 1 for n in counts), "single- and multi-lesion studies both present"
    patients = [t["patient_id"] for t in truths]
    assert len(set(patients)) == N_STUDIES - 1, "one patient is scanned twice"
    repeat = [t for t in truths if patients.count(t["patient_id"]) == 2]
    assert repeat[0]["study_date"] < repeat[1]["study_date"]
    assert [t["mask_format"] for t in truths].count("SEG") == 1
    for t in truths:
        folder = cohort / t["dicom_folder"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(["CT", "PET", t["mask_format"]])
        assert len(list((folder / "PET").glob("*.dcm"))) == SIZE_PRESETS["small"].pet_shape_zyx[0]
        assert t["lesions"] and len(t["lesions"]) == t["n_lesions"]
    with (cohort / "phantom_lesions.csv").open() as f:
        assert len(list(csv.DictReader(f))) == sum(counts)


def test_lesions_are_where_the_mask_says(cohort):
    for t in _truths(cohort):
        suv = _read(cohort / "truth" / t["study_folder"] / "suv_bw.nii.gz").astype(np.float64)
        labels = _read(cohort / "truth" / t["study_folder"] / "lesion_mask.nii.gz")
        assert sorted(np.unique(labels)) == list(range(t["n_lesions"] + 1))
        voxel_ml = np.prod(t["pet_grid"]["spacing_mm_xyz"]) / 1000.0
        for lesion in t["lesions"]:
            mask = labels == lesion["label"]
            # The SUV peak of the lesion's neighbourhood (mask grown by one voxel) lies inside its mask.
            around = binary_dilation(mask, np.ones((3, 3, 3), bool)) & ((labels == 0) | mask)
            peak = np.unravel_index(np.argmax(np.where(around, suv, -np.inf)), suv.shape)
            assert mask[peak], f"{t['study_folder']} lesion {lesion['label']}: SUV peak outside its mask"
            assert suv[mask].max() == pytest.approx(lesion["suv_max"], rel=1e-4)
            assert mask[tuple(lesion["suv_max_index_zyx"])]
            assert suv[mask].max() > 1.3 * np.median(suv[around & ~mask])
            assert lesion["voxels"] == mask.sum() and lesion["volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
            # Volume as drawn: within one voxel or 25 % of the target.
            target_voxels = lesion["target_volume_ml"] / voxel_ml
            assert abs(mask.sum() - target_voxels) <= max(1.0, 0.25 * target_voxels)
            centre = np.round(lesion["center_index_zyx"]).astype(int)
            assert np.abs(np.argwhere(mask) - centre).sum(axis=1).min() <= 1


def test_lesion_statistics_match_the_paper_cohort():
    rng = np.random.default_rng(0)
    volumes = sample_lesion_volumes_ml(rng, 60_000)
    suv_max = sample_lesion_suv_max(rng, 60_000)
    assert volumes.mean() == pytest.approx(PAPER_LESION_VOLUME_ML[0], rel=0.03)
    assert volumes.std() == pytest.approx(PAPER_LESION_VOLUME_ML[1], rel=0.08)
    assert suv_max.mean() == pytest.approx(PAPER_LESION_SUV_MAX[0], rel=0.03)
    assert suv_max.std() == pytest.approx(PAPER_LESION_SUV_MAX[1], rel=0.08)
    assert suv_max.min() >= LESION_SUV_MAX_RANGE[0] and suv_max.max() <= LESION_SUV_MAX_RANGE[1]

    specs = plan_cohort(60, seed=11, size="default")
    counts = np.array([len(s.lesions) for s in specs])
    assert counts.min() >= 1 and counts.max() <= 5 and 1.5 < counts.mean() < 2.4
    assert sum(s.study_index == 1 for s in specs) == round(0.15 * 60)
    assert all(95 <= s.uptake_s / 60 <= 150 for s in specs)
    assert {le.site for s in specs for le in s.lesions} == {"prostate_bed", "pelvic_node", "bone"}
    assert study_layout(3) == [(0, 0), (1, 0), (2, 0)] and study_layout(4) == [(0, 0), (1, 0), (2, 0), (2, 1)]


# ------------------------------------------------------------------------------------------------ DICOM
def test_pet_and_ct_read_back_with_simpleitk_and_pydicom(cohort):
    t = _truths(cohort)[0]
    folder = cohort / t["dicom_folder"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "PET")))
    reader.SetOutputPixelType(sitk.sitkFloat64)
    pet = reader.Execute()
    truth = sitk.ReadImage(str(cohort / "truth" / t["study_folder"] / "suv_bw.nii.gz"))
    assert pet.GetSize() == truth.GetSize()
    np.testing.assert_allclose(pet.GetOrigin(), truth.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(pet.GetSpacing(), truth.GetSpacing(), atol=1e-6)
    suv = sitk.GetArrayFromImage(pet) * t["suv_scale_g_per_bq"]
    np.testing.assert_allclose(suv, sitk.GetArrayFromImage(truth), rtol=1e-5, atol=1e-5)

    ct = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "CT")))
    assert all(c < p for c, p in zip(ct.GetSpacing(), pet.GetSpacing())), "CT grid is finer"
    ct_lo, ct_hi = np.array(ct.GetOrigin()), np.array(ct.TransformIndexToPhysicalPoint(ct.GetSize()))
    pet_lo, pet_hi = np.array(pet.GetOrigin()), np.array(pet.TransformIndexToPhysicalPoint(pet.GetSize()))
    assert np.all(ct_lo < pet_lo) and np.all(ct_hi[:2] > pet_hi[:2]), "CT field of view differs and covers PET"
    ct_hu = sitk.GetArrayViewFromImage(ct)
    assert ct_hu.min() >= -1024 and ct_hu.max() > 500  # air and bone

    slices = [pydicom.dcmread(p) for p in sorted((folder / "PET").glob("*.dcm"))]
    first = slices[0]
    assert (first.Modality, first.Units, first.DecayCorrection) == ("PT", "BQML", "START")
    rp = first.RadiopharmaceuticalInformationSequence[0]
    assert float(rp.RadionuclideHalfLife) == pytest.approx(6586.2)
    assert float(rp.RadionuclideTotalDose) == t["injected_dose_bq"] and float(first.PatientWeight) == t["weight_kg"]
    uptake_min = (int(first.SeriesTime[:2]) * 60 + int(first.SeriesTime[2:4])) - (
        int(rp.RadiopharmaceuticalStartTime[:2]) * 60 + int(rp.RadiopharmaceuticalStartTime[2:4]))
    assert 95 <= uptake_min <= 150
    assert len({s.RescaleSlope for s in slices}) > 1, "per-slice rescale"
    assert len({s.AcquisitionTime for s in slices}) > 1, "bed positions acquired one after the other"
    assert len({s.FrameOfReferenceUID for s in slices}) == 1
    assert pydicom.dcmread(next((folder / "CT").glob("*.dcm"))).FrameOfReferenceUID == first.FrameOfReferenceUID


def _rasterize_rtstruct(path: Path, t: dict) -> dict[str, np.ndarray]:
    """Independent even-odd rasterization of every ROI on the PET grid (voxel centre in polygon)."""
    ds = pydicom.dcmread(path)
    nz, ny, nx = t["pet_grid"]["shape_zyx"]
    (ox, oy, oz), (sx, sy, sz) = t["pet_grid"]["origin_mm_xyz"], t["pet_grid"]["spacing_mm_xyz"]
    yy, xx = np.mgrid[0:ny, 0:nx]
    centres = np.stack([ox + xx.ravel() * sx, oy + yy.ravel() * sy], axis=1)
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    masks = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros((nz, ny, nx), bool)
        for contour in roi.ContourSequence:
            xyz = np.asarray(contour.ContourData, float).reshape(-1, 3)
            k = int(round((xyz[0, 2] - oz) / sz))
            mask[k] ^= PolygonPath(xyz[:, :2]).contains_points(centres).reshape(ny, nx)
        masks[names[roi.ReferencedROINumber]] = mask
    return masks


def test_rtstruct_contours_give_the_truth_mask(cohort):
    for t in [t for t in _truths(cohort) if t["mask_format"] == "RTSTRUCT"][:2]:
        rs_path = cohort / t["dicom_folder"] / "RTSTRUCT" / "RTSTRUCT.dcm"
        ds = pydicom.dcmread(rs_path)
        referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == t["pet_series_instance_uid"]
        labels = _read(cohort / "truth" / t["study_folder"] / "lesion_mask.nii.gz")
        masks = _rasterize_rtstruct(rs_path, t)
        lesion_rois = [name for name in masks if "lesion" in name.lower()]
        assert len(lesion_rois) == t["n_lesions"] and len(masks) > len(lesion_rois), "organ ROIs too"
        for lesion in t["lesions"]:
            np.testing.assert_array_equal(masks[lesion["roi_name"]], labels == lesion["label"])
        assert "Bladder" in masks and masks["Bladder"].sum() > 50


def test_seg_reads_back_with_highdicom(cohort):
    import highdicom as hd

    t = next(t for t in _truths(cohort) if t["mask_format"] == "SEG")
    seg = hd.seg.segread(cohort / t["dicom_folder"] / "SEG" / "SEG.dcm")
    assert seg.number_of_segments == t["n_lesions"]
    assert all("lesion" in s.SegmentLabel.lower() for s in seg.SegmentSequence)
    volume = seg.get_volume(combine_segments=True)
    labels = _read(cohort / "truth" / t["study_folder"] / "lesion_mask.nii.gz")
    # The SEG keeps only frames with lesion; find each on the PET grid by its z position (mm).
    oz, sz = t["pet_grid"]["origin_mm_xyz"][2], t["pet_grid"]["spacing_mm_xyz"][2]
    stack = np.asarray(volume.array)
    sx, sy, _ = t["pet_grid"]["spacing_mm_xyz"]
    assert np.allclose(volume.affine[:2, :3], [[0, 0, sx], [0, sy, 0]]), "rows along y, columns along x"
    z_mm = volume.affine[2, 3] + volume.affine[2, 0] * np.arange(stack.shape[0])
    k = np.round((z_mm - oz) / sz).astype(int)
    np.testing.assert_array_equal(stack, labels[k])
    assert np.count_nonzero(labels) == np.count_nonzero(stack)


def test_pixel_boundaries_fill_back_to_the_mask():
    rng = np.random.default_rng(5)
    masks = [rng.random((9, 11)) > 0.55 for _ in range(20)]
    ring = np.ones((7, 7), bool)
    ring[2:5, 2:5] = False  # a hole
    diagonal = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], bool)  # corner-touching pixels
    for mask in [*masks, ring, diagonal]:
        yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
        centres = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(float)
        filled = np.zeros(mask.size, bool)
        for polygon in trace_pixel_boundaries(mask):
            filled ^= PolygonPath(polygon).contains_points(centres)
        np.testing.assert_array_equal(filled.reshape(mask.shape), mask)
    assert len(trace_pixel_boundaries(ring)) == 2 and len(trace_pixel_boundaries(diagonal)) == 3


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_files_and_folder_rules(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert l1dfl_main(["phantom", str(out), "--cases", "1", "--size", "small", "--seed", "7"]) == 0
    assert _tree_digest(a / "dicom") == _tree_digest(b / "dicom")
    # Re-running with the same parameters keeps the study; other parameters are refused.
    stamp = next((a / "dicom").rglob("PT_0001.dcm")).stat().st_mtime_ns
    assert l1dfl_main(["phantom", str(a), "--cases", "1", "--size", "small", "--seed", "7"]) == 0
    assert next((a / "dicom").rglob("PT_0001.dcm")).stat().st_mtime_ns == stamp
    assert l1dfl_main(["phantom", str(a), "--cases", "1", "--size", "small", "--seed", "8"]) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a cohort")
    assert l1dfl_main(["phantom", str(tmp_path / "other"), "--cases", "1", "--size", "small"]) == 1
    assert (tmp_path / "other" / "notes.txt").read_text() == "not a cohort"


# ------------------------------------------------------------------------------------------------ converter
def test_converted_dataset_matches_the_truth(cohort, tmp_path, nnunet_env):
    raw = tmp_path / "raw"
    code = l1dfl_main(["convert", "dicom", str(cohort / "dicom"), "-d", "977", "-n", "PhantomTruth", "-o", str(raw),
                       "--no-progress"])
    assert code == 0
    dataset = raw / "Dataset977_PhantomTruth"
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == N_STUDIES
    # The converter's per-case table names patient and study date: the key of the phantom's studies.
    by_study = {(t["patient_id"], t["study_date"].replace("-", "")): t for t in _truths(cohort)}
    with (dataset / "case_metadata.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_STUDIES
    for row in rows:
        t = by_study[(row["patient"], row["study_date"].replace("-", ""))]
        case = row["case_id"]
        pet = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_0001.nii.gz"))
        truth = sitk.ReadImage(str(cohort / "truth" / t["study_folder"] / "suv_bw.nii.gz"))
        np.testing.assert_allclose(pet.GetOrigin(), truth.GetOrigin(), atol=1e-3)
        suv, suv_truth = sitk.GetArrayFromImage(pet), sitk.GetArrayFromImage(truth)
        inside = suv_truth > 0.05  # relative error where there is activity
        assert np.max(np.abs(suv[inside] - suv_truth[inside]) / suv_truth[inside]) < 0.01, case
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz")))
        lesions = _read(cohort / "truth" / t["study_folder"] / "lesion_mask.nii.gz")
        np.testing.assert_array_equal(label > 0, lesions > 0)
        assert int(row["n_lesions"]) == t["n_lesions"]
        for lesion in t["lesions"]:
            assert suv[lesions == lesion["label"]].max() == pytest.approx(lesion["suv_max"], rel=0.01)


def test_heldout_studies_are_new_patients_outside_the_cohort(tmp_path):
    """--heldout N: test studies of further patients, outside dicom/ (the converter never sees them);
    the cohort itself is the one written without --heldout."""
    from nnunetv2_l1dfl.phantom.cohort import plan_heldout

    out = tmp_path / "cohort"
    assert l1dfl_main(["phantom", str(out), "--cases", "4", "--heldout", "2", "--size", "small", "--seed", "5"]) == 0
    index = load_cohort(out)
    assert index["parameters"]["n_heldout"] == 2 and len(index["studies"]) == 4
    held = index["heldout_studies"]
    cohort_patients = {s["patient_id"] for s in index["studies"]}
    assert len(held) == 2 and not cohort_patients & {s["patient_id"] for s in held}
    assert len({s["patient_id"] for s in held}) == 2
    for study in held:
        assert (out / study["dicom"] / "PET").is_dir() and study["dicom"].startswith("heldout_dicom/")
        truth = json.loads((out / study["truth"] / "truth.json").read_text())
        assert truth["n_lesions"] == study["n_lesions"] >= 1
        assert not (out / "dicom" / study["study_folder"]).exists()
    studies_in_dicom = {p.parent.name + "/" + p.name for p in (out / "dicom").glob("*/*")}
    assert studies_in_dicom == {s["study_folder"] for s in index["studies"]}
    with (out / "phantom_lesions.csv").open() as f:  # the cohort's lesions only
        assert len(list(csv.DictReader(f))) == sum(s["n_lesions"] for s in index["studies"])
    # the cohort's DICOM is byte for byte the one written without held-out studies
    plain = tmp_path / "plain"
    assert l1dfl_main(["phantom", str(plain), "--cases", "4", "--size", "small", "--seed", "5"]) == 0
    assert _tree_digest(plain / "dicom") == _tree_digest(out / "dicom")
    # other held-out counts are other parameters: refused without --overwrite
    assert l1dfl_main(["phantom", str(out), "--cases", "4", "--heldout", "3", "--size", "small", "--seed", "5"]) == 1
    assert [s.patient_id for s in plan_heldout(2, 4, 5, "small")] == [s["patient_id"] for s in held]
