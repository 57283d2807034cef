"""``l1dfl convert dicom`` on synthetic DICOM studies written by the tests.

The tree (built once per module): patient ``PAT/001 X`` with two studies (RTSTRUCT drawn on a CT
with another grid and a smaller field of view than the PET; DICOM SEG on the PET), patient
``PAT_0001`` (RTSTRUCT on the PET), patient ``NOWEIGHT`` whose PET lacks PatientWeight, and a
corrupt file. The last test runs ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import _conversion_helpers as h
import numpy as np
import pytest
import SimpleITK as sitk
from _dicom_factories import write_ct_series, write_pet_series, write_rtstruct, write_seg

from nnunetv2_l1dfl.cli import main

WEIGHT_KG, DOSE_BQ, HALF_LIFE_S = 75.0, 3.5e8, 6586.2
# Series time 11:00, injection 10:00, DecayCorrection START: the dose decays for one hour.
BQML_PER_SUV = DOSE_BQ * 2.0 ** (-3600.0 / HALF_LIFE_S) / (WEIGHT_KG * 1000.0)

CASE_A, CASE_B, CASE_C, CASE_BAD = (
    "PAT-001-X_20240101",
    "PAT-001-X_20240301",
    "PAT-0001_20240101",
    "NOWEIGHT_20240101",
)


def _study(root: Path, patient: str, date: str, *, ct_grid: str, mask: str, omit=(), half_life=HALF_LIFE_S) -> dict:
    from pydicom.uid import generate_uid

    study_uid, frame_uid = generate_uid(), generate_uid()
    common = dict(patient_id=patient, study_uid=study_uid, frame_of_reference_uid=frame_uid, study_date=date)
    pet_files = write_pet_series(
        root / "pet", h.pet_suv_volume() * BQML_PER_SUV, h.PET_SPACING, h.PET_ORIGIN,
        weight_kg=WEIGHT_KG, dose_bq=DOSE_BQ, half_life=half_life, omit=omit, **common,
    )  # fmt: skip
    if ct_grid == "ct":
        ct_files = write_ct_series(root / "ct", h.ct_volume(), h.CT_SPACING, h.CT_ORIGIN, **common)
    else:
        ct_files = write_ct_series(
            root / "ct",
            h.ct_volume(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN),
            h.PET_SPACING,
            h.PET_ORIGIN,
            **common,
        )
    if mask == "rtstruct-on-ct":
        grid = (h.CT_SHAPE, h.CT_SPACING, h.CT_ORIGIN)
        rois = {
            "Lesion 1": h.lesion_mask(*grid, lesions=h.LESIONS_MM[:1]),
            "LESION_2": h.lesion_mask(*grid, lesions=h.LESIONS_MM[1:]),
            "Liver": h.sphere(*grid, centre_mm=(12.0, -12.0, 20.0), radius_mm=6.0),  # not a lesion: left out
        }
        write_rtstruct(root / "rt" / "rtstruct.dcm", ct_files, rois)
    elif mask == "rtstruct-on-pet":
        write_rtstruct(
            root / "rt" / "rs.dcm",
            pet_files,
            {"Lesions": h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)},
        )
    elif mask == "seg-on-pet":
        write_seg(
            root / "seg" / "seg.dcm",
            pet_files,
            {"Tumor": h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)},
        )
    return {"study_uid": study_uid, "pet": pet_files, "ct": ct_files}


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dicom") / "export"
    studies = {
        CASE_A: _study(root / "p1" / "s1", "PAT/001 X", "20240101", ct_grid="ct", mask="rtstruct-on-ct"),
        CASE_B: _study(
            root / "p1" / "s2" / "deeper", "PAT/001 X", "20240301", ct_grid="ct", mask="seg-on-pet"
        ),
        CASE_C: _study(root / "p2", "PAT_0001", "20240101", ct_grid="pet", mask="rtstruct-on-pet"),
        CASE_BAD: _study(
            root / "p3", "NOWEIGHT", "20240101", ct_grid="pet", mask="rtstruct-on-pet", omit=["PatientWeight"]
        ),
    }
    (root / "junk").mkdir()
    (root / "junk" / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    return root, studies


def _convert(root: Path, raw: Path, *extra: str) -> int:
    return main(
        ["convert", "dicom", str(root), "-d", "501", "-n", "Dicom", "-o", str(raw), "--no-progress", *extra]
    )


def _metadata(dataset: Path) -> dict[str, dict[str, str]]:
    with (dataset / "case_metadata.csv").open(newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def test_dicom_conversion_end_to_end(dicom_tree, tmp_path, capsys):
    root, _ = dicom_tree
    raw = tmp_path / "raw"
    assert _convert(root, raw) == 1  # NOWEIGHT fails -> non-zero exit
    out = capsys.readouterr()
    assert re.search(rf"FAILED {CASE_BAD}: .*PatientWeight \(0010,1030\)", out.err), out.err
    assert "corrupt.dcm" in out.out  # the skipped file is reported, not fatal

    dataset = raw / "Dataset501_Dicom"
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 3
    assert dataset_json["channel_names"] == {"0": "CT", "1": "CT"}
    assert (
        "SUVbw" in dataset_json["channel_modalities"]["1"]
        and "Hounsfield" in dataset_json["channel_modalities"]["0"]
    )

    for case in (CASE_A, CASE_B, CASE_C):
        ct = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        pet = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_0001.nii.gz"))
        label = sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz"))
        assert (
            ct.GetPixelID() == pet.GetPixelID() == sitk.sitkFloat32 and label.GetPixelID() == sitk.sitkUInt8
        )
        for image in (ct, label):  # one geometry for the three files, the PET's
            assert image.GetSize() == pet.GetSize() == h.PET_SHAPE[::-1]
            assert np.allclose(image.GetOrigin(), h.PET_ORIGIN) and np.allclose(
                image.GetSpacing(), h.PET_SPACING
            )
        suv = sitk.GetArrayFromImage(pet)
        labels = sitk.GetArrayFromImage(label)
        assert suv.max() == pytest.approx(h.LESION_SUV, rel=2e-3)
        assert np.median(suv[labels > 0]) == pytest.approx(h.LESION_SUV, rel=2e-3)
        if case != CASE_C:
            hu = sitk.GetArrayFromImage(ct)
            assert np.all(hu[:2] == -1024)  # PET slices at z = 0, 4 mm lie before the CT (starts at 8 mm)
            assert hu[6, 8, 8] == pytest.approx(h.BODY_HU, abs=1)
    expected_voxels = int(h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN).sum())
    rows = _metadata(dataset)
    assert set(rows) == {CASE_A, CASE_B, CASE_C}
    for case, row in rows.items():
        assert row["n_lesions"] == "2", (case, row)
        assert row["suv_branch"].startswith("BQML|START|SeriesTime")
        assert row["tracer"] == "FDG" and "l1dfl-tests" in row["scanner"]
    assert rows[CASE_A]["patient"] == rows[CASE_B]["patient"] == "PAT/001 X"  # one patient, two studies
    assert "CT not covering PET" in rows[CASE_A]["warnings"] and rows[CASE_C]["warnings"] == ""
    # RTSTRUCT drawn on the 2 mm CT, resampled to the 4 mm PET grid: the CT-grid volume within 20 %.
    ct_grid_ml = h.lesion_mask(h.CT_SHAPE, h.CT_SPACING, h.CT_ORIGIN).sum() * 8 / 1000
    assert float(rows[CASE_A]["tmtv_ml"]) == pytest.approx(ct_grid_ml, rel=0.2)
    assert float(rows[CASE_C]["tmtv_ml"]) == pytest.approx(expected_voxels * 64 / 1000, rel=1e-6)
    liver = h.sphere(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN, (12.0, -12.0, 20.0), 4.0)
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / f"{CASE_A}.nii.gz")))[
        liver
    ].any()

    # Re-run: finished cases are skipped, the failure stays, --allow-failures gives exit 0.
    assert _convert(root, raw, "--allow-failures") == 0
    assert "0 converted, 3 already done, 1 failed" in capsys.readouterr().out


def test_dicom_conversion_of_a_declared_nuclide(tmp_path, capsys):
    """A tracer labelled with a nuclide the half-life table lacks fails, naming the tag, until
    ``--nuclide`` declares it; the SUV then uses the header's half-life."""
    root = tmp_path / "export"
    _study(root / "p1", "SC44", "20240101", ct_grid="pet", mask="rtstruct-on-pet", half_life=14292.0)
    raw = tmp_path / "raw"
    assert _convert(root, raw) == 1
    assert re.search(r"FAILED SC44_20240101: .*RadionuclideHalfLife \(0018,1075\)", capsys.readouterr().err)
    assert _convert(root, raw, "--nuclide", "Sc-44=14292") == 0
    pet = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "Dataset501_Dicom" / "imagesTr" / "SC44_20240101_0001.nii.gz")))
    # the series was written for F-18 decay (BQML_PER_SUV): one hour with Sc-44's half-life instead
    expected = h.LESION_SUV * 2.0 ** (-3600.0 / HALF_LIFE_S) / 2.0 ** (-3600.0 / 14292.0)
    assert pet.max() == pytest.approx(expected, rel=2e-3)


def test_dicom_pseudonymize_and_manifest(dicom_tree, tmp_path, capsys):
    root, studies = dicom_tree
    raw = tmp_path / "raw"
    code = main(
        [
            "convert",
            "dicom",
            str(root),
            "-d",
            "502",
            "-n",
            "Pseudo",
            "-o",
            str(raw),
            "--no-progress",
            "--pseudonymize",
        ]
    )
    assert code == 1
    dataset = raw / "Dataset502_Pseudo"
    key_path = raw / "pseudonym_key_Dataset502_Pseudo.csv"
    assert str(key_path) in capsys.readouterr().out and key_path.is_file()
    with key_path.open(newline="") as f:
        key = list(csv.DictReader(f))
    ids = {r["patient_id"]: set() for r in key}
    for r in key:
        ids[r["patient_id"]].add(r["case_id"])
    assert set(ids) == {"PAT/001 X", "PAT_0001", "NOWEIGHT"} and len(ids["PAT/001 X"]) == 2
    cases = sorted(p.name[: -len(".nii.gz")] for p in (dataset / "labelsTr").iterdir())
    assert len(cases) == 3 and all(re.fullmatch(r"P[0-9a-f]{10}_s[12]", c) for c in cases)
    for text_file in [*dataset.rglob("*.json"), *dataset.rglob("*.csv")]:  # no patient ID or date left
        text = text_file.read_text()
        # (the study date as DICOM writes it and as ISO; a bare "2024" can occur inside a random hex pseudonym)
        assert "PAT" not in text and "NOWEIGHT" not in text, text_file
        assert not any(d in text for d in ("20240101", "2024-01-01", "20240301", "2024-03-01")), text_file
    # The per-series report: in the dataset only status, case ID and file count; in full beside the key.
    in_dataset = _series_report(dataset)
    assert sorted(r["status"] for r in in_dataset) == ["converted"] * 3 + ["failed"] and set(in_dataset[0]) == {
        "pet_series_uid", "files", "status", "case_id", "reason"
    } and not any(r["pet_series_uid"] or r["reason"] for r in in_dataset)  # fmt: skip
    full = raw / "pseudonym_key_Dataset502_Pseudo_dicom_series_report.csv"
    with full.open(newline="") as f:
        reasons = [r["reason"] for r in csv.DictReader(f) if r["status"] == "failed"]
    assert len(reasons) == 1 and "PatientWeight (0010,1030)" in reasons[0]
    # A re-run reuses the key: same IDs, nothing converted again.
    assert (
        main(
            [
                "convert",
                "dicom",
                str(root),
                "-d",
                "502",
                "-n",
                "Pseudo",
                "-o",
                str(raw),
                "--no-progress",
                "--pseudonymize",
            ]
        )
        == 1
    )
    assert "0 converted, 3 already done" in capsys.readouterr().out

    # Manifest: explicit PET folder, CT by SeriesInstanceUID, a NIfTI mask on the PET grid.
    import pydicom

    ct_uid = pydicom.dcmread(studies[CASE_C]["ct"][0], stop_before_pixels=True).SeriesInstanceUID
    h.write_image(h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN, lesions=h.LESIONS_MM[:1]),
                         tmp_path / "masks" / "one.nii.gz", h.PET_SPACING, h.PET_ORIGIN)  # fmt: skip
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f"case,patient,pet,ct,mask\nmy case/1,P1,{root / 'p2' / 'pet'},{ct_uid},masks/one.nii.gz\n"
    )
    assert main(["convert", "dicom", str(root), "-d", "503", "-n", "Manifest", "-o", str(raw), "--no-progress",
                 "--manifest", str(manifest)]) == 0  # fmt: skip
    rows = _metadata(raw / "Dataset503_Manifest")
    assert (
        list(rows) == ["my-case-1"]
        and rows["my-case-1"]["n_lesions"] == "1"
        and rows["my-case-1"]["patient"] == "P1"
    )


def test_converted_dataset_passes_nnunet_verify(dicom_tree, nnunet_env, tmp_path, repo_root):
    root, _ = dicom_tree
    raw = Path(nnunet_env["nnUNet_raw"])
    assert _convert(root, raw, "--allow-failures") == 0
    assert (raw / "Dataset501_Dicom" / "case_metadata.csv").is_file()  # extra files must not upset nnU-Net
    result = subprocess.run(
        ["nnUNetv2_plan_and_preprocess", "-d", "501", "--verify_dataset_integrity", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ), timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "verify_dataset_integrity Done" in log
    assert (
        "Warning" not in log.split("verify_dataset_integrity Done")[0]
    )  # no origin/direction mismatch warnings
    preprocessed = Path(nnunet_env["nnUNet_preprocessed"]) / "Dataset501_Dicom"
    assert (preprocessed / "nnUNetPlans.json").is_file()


# ----------------------------------------------------------------------------------------------
# Accounting: every PET series ends converted, failed or skipped, with the reason, in a report
# ----------------------------------------------------------------------------------------------


def _edit(files, **attributes) -> None:
    import pydicom

    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def _series_report(dataset: Path) -> list[dict[str, str]]:
    with (dataset / ".l1dfl" / "dicom_series_report.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_every_pet_series_is_accounted_for(tmp_path, capsys):
    """One PET file whose Modality reads CT used to make its patient vanish with exit code 0."""
    from pydicom.uid import generate_uid

    root = tmp_path / "export"
    _study(root / "good", "GOOD", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    odd = _study(root / "odd", "ODD", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    _edit(odd["pet"][:1], Modality="CT")  # pet_000.dcm: sorted first, it named the series' modality
    both = _study(root / "both", "BOTH", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    import pydicom

    first = pydicom.dcmread(both["pet"][0])
    nac = write_pet_series(
        root / "both" / "pet_nac", h.pet_suv_volume() * BQML_PER_SUV, h.PET_SPACING, h.PET_ORIGIN,
        patient_id="BOTH", study_uid=first.StudyInstanceUID, frame_of_reference_uid=first.FrameOfReferenceUID,
        series_uid=generate_uid(), CorrectedImage=["NORM", "DECY"],
    )  # fmt: skip
    lone = _study(root / "lone", "LONE", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    _edit(lone["pet"], CorrectedImage=["DECY", "NORM"])

    raw = tmp_path / "raw"
    assert _convert(root, raw) == 1
    out, err = capsys.readouterr()
    assert re.search(
        rf"FAILED ODD_20240101: {re.escape(str(odd['pet'][0]))}: Modality \(0008,0060\) 'CT' differs from 'PT'", err
    ), err
    assert re.search(r"FAILED LONE_20240101: .*pet_000\.dcm: CorrectedImage \(0028,0051\) is DECY\\NORM, without ATTN", err)
    assert "--allow-non-attenuation-corrected" in err
    nac_uid = _uid(nac[0])
    assert f"SKIPPED PET {nac_uid}: " in out and "not attenuation-corrected" in out
    assert "PET series: 5 found; 2 converted, 0 already done, 2 failed, 1 skipped" in out
    assert "2 converted, 0 already done, 2 failed, 1 skipped with a reason" in out
    dataset = raw / "Dataset501_Dicom"
    rows = {r["pet_series_uid"]: r for r in _series_report(dataset)}
    assert len(rows) == 5
    assert rows[_uid(odd["pet"][1])]["status"] == "failed" and rows[_uid(odd["pet"][1])]["files"] == "12"
    assert "Modality (0008,0060)" in rows[_uid(odd["pet"][1])]["reason"]
    assert rows[nac_uid]["status"] == "skipped" and _uid(both["pet"][0]) in rows[nac_uid]["reason"]
    assert {r["status"] for r in rows.values()} == {"converted", "failed", "skipped"}
    assert {r["case_id"] for r in rows.values() if r["status"] == "converted"} == {"GOOD_20240101", "BOTH_20240101"}

    # The lone non-attenuation-corrected PET, accepted knowingly: converted, the compromise recorded.
    assert _convert(root, raw, "--allow-non-attenuation-corrected") == 1  # ODD still fails
    out = capsys.readouterr().out
    assert "PET series: 5 found; 1 converted, 2 already done, 1 failed, 1 skipped" in out
    warning = _metadata(dataset)["LONE_20240101"]["warnings"]
    assert "CorrectedImage (0028,0051) is DECY\\NORM, without ATTN" in warning
    assert "--allow-non-attenuation-corrected" in warning


def test_a_pet_without_corrected_image_fails_naming_the_tag(tmp_path, capsys):
    root = tmp_path / "export"
    _study(root / "a", "NOCI", "20240101", ct_grid="pet", mask="rtstruct-on-pet", omit=["CorrectedImage"])
    assert _convert(root, tmp_path / "raw") == 1
    assert re.search(r"FAILED NOCI_20240101: .*CorrectedImage \(0028,0051\) is absent, without ATTN", capsys.readouterr().err)


def test_one_patient_id_for_two_people_is_not_merged(tmp_path, capsys):
    """Same PatientID, different PatientName: two people, who must not share a split group."""
    root = tmp_path / "export"
    for folder, patient, date, name, birth in (
        ("a", "SAMEID", "20240101", "DOE^JANE", "19600101"),
        ("b", "SAMEID", "20240301", "ROE^RICHARD", "19600101"),
        # The same person written differently (case, trailing '^', a blank birth date) is one patient.
        ("c", "ONE", "20240101", "Doe^John^^", "19500505"),
        ("d", "ONE", "20240301", "DOE^JOHN", ""),
    ):
        _study(root / folder, patient, date, ct_grid="pet", mask="rtstruct-on-pet")
        _edit(sorted((root / folder).rglob("*.dcm")), PatientName=name, PatientBirthDate=birth)
    raw = tmp_path / "raw"
    assert _convert(root, raw) == 1
    out, err = capsys.readouterr()
    for case in ("SAMEID_20240101", "SAMEID_20240301"):
        assert re.search(rf"FAILED {case}: one PatientID \(0010,0020\) for different patients: PatientName \(0010,0010\) differs", err), err
    assert "JANE" not in err + out and "RICHARD" not in err + out  # the names themselves are not printed
    rows = _metadata(raw / "Dataset501_Dicom")
    assert set(rows) == {"ONE_20240101", "ONE_20240301"}, out + err
    assert rows["ONE_20240101"]["patient"] == rows["ONE_20240301"]["patient"] == "ONE"


def test_pet_and_ct_of_different_patients_in_one_study_fail(tmp_path, capsys):
    root = tmp_path / "export"
    study = _study(root / "a", "PETPAT", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    _edit(study["ct"], PatientID="SOMEONEELSE")
    assert _convert(root, tmp_path / "raw") == 1
    assert re.search(r"FAILED PETPAT_20240101: PET and CT are not of one patient: PatientID \(0010,0020\) differs", capsys.readouterr().err)


def test_a_stray_pet_file_with_another_series_uid_fails_both_parts(tmp_path, capsys):
    """A slice whose SeriesInstanceUID is corrupt would be a one-slice case and leave its series short."""
    from pydicom.uid import generate_uid

    root = tmp_path / "export"
    study = _study(root / "a", "STRAY", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    stray_uid = generate_uid()
    _edit(study["pet"][-1:], SeriesInstanceUID=stray_uid)
    raw = tmp_path / "raw"
    assert _convert(root, raw) == 1
    out, err = capsys.readouterr()
    assert "0 converted" in out
    assert len(re.findall(r"FAILED STRAY_20240101(-\d)?: .*SeriesNumber \(0020,0011\) 2\) carry 2 SeriesInstanceUIDs \(0020,000E\)", err)) == 2, err
    assert stray_uid in err and "pet_011.dcm" in err


def test_incomplete_pet_series_by_number_of_slices_fails(tmp_path, capsys):
    root = tmp_path / "export"
    study = _study(root / "a", "SHORT", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    _edit(study["pet"], NumberOfSlices=len(study["pet"]))
    study["pet"][-1].unlink()  # the last slice: the remaining eleven are still evenly spaced
    assert _convert(root, tmp_path / "raw") == 1
    assert re.search(r"FAILED SHORT_20240101: .*NumberOfSlices \(0054,0081\) is 12 but .* has 11 files", capsys.readouterr().err)


def test_manifest_blank_mask_cell_fails_unless_allowed(tmp_path, capsys):
    root = tmp_path / "export"
    first = _study(root / "a", "MAN1", "20240101", ct_grid="pet", mask="none")
    second = _study(root / "b", "MAN2", "20240101", ct_grid="pet", mask="none")
    _study(root / "c", "MAN3", "20240101", ct_grid="pet", mask="none")  # not in the manifest
    mask = h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)
    truncated = h.write_image(mask, tmp_path / "cut.nii.gz", h.PET_SPACING, h.PET_ORIGIN)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "case,patient,pet,ct,mask\n"
        f"blank,P1,{root / 'a' / 'pet'},{root / 'a' / 'ct'},\n"
        f"cut,P2,{root / 'b' / 'pet'},{root / 'b' / 'ct'},{truncated}\n"
    )
    raw = tmp_path / "raw"
    assert _convert(root, raw, "--manifest", str(manifest)) == 1
    out, err = capsys.readouterr()
    assert re.search(rf"FAILED blank: manifest {re.escape(str(manifest))} line 2, case blank: the mask cell is blank", err), err
    assert re.search(rf"FAILED cut: case cut: mask {re.escape(str(truncated))}: truncated or corrupt gzip stream", err), err
    assert "PET series: 3 found; 0 converted, 0 already done, 2 failed, 1 skipped" in out
    assert "not named in the pet column of --manifest" in out
    rows = {r["case_id"]: r for r in _series_report(raw / "Dataset501_Dicom")}
    assert rows["blank"]["pet_series_uid"] == _uid(first["pet"][0]) and rows["cut"]["pet_series_uid"] == _uid(second["pet"][0])

    assert _convert(root, raw, "--manifest", str(manifest), "--allow-missing-mask") == 1  # the cut mask still fails
    capsys.readouterr()
    row = _metadata(raw / "Dataset501_Dicom")["blank"]
    assert row["n_lesions"] == "0" and "lesion-free (--allow-missing-mask)" in row["warnings"]


def test_an_empty_patient_id_for_two_people_is_not_merged(tmp_path, capsys):
    """Without PatientID every study would fall into one patient group: different names fail."""
    root = tmp_path / "export"
    for folder, date, name in (("a", "20240101", "DOE^JANE"), ("b", "20240301", "ROE^RICHARD")):
        _study(root / folder, "", date, ct_grid="pet", mask="rtstruct-on-pet")
        _edit(sorted((root / folder).rglob("*.dcm")), PatientName=name)
    assert _convert(root, tmp_path / "raw") == 1
    out, err = capsys.readouterr()
    assert len(re.findall(r"FAILED .*: an empty PatientID \(0010,0020\) for different patients: PatientName \(0010,0010\) differs", err)) == 2, err
    assert "0 converted" in out


def test_a_pet_labelled_ct_throughout_is_found_by_its_sop_class_and_fails(tmp_path, capsys):
    root = tmp_path / "export"
    _study(root / "good", "GOOD", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    study = _study(root / "ct_pet", "LABELLED", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    _edit(study["pet"], Modality="CT")
    raw = tmp_path / "raw"
    assert _convert(root, raw) == 1
    out, err = capsys.readouterr()
    assert re.search(r"FAILED LABELLED_20240101: .*pet_000\.dcm: Modality \(0008,0060\) 'CT' contradicts SOPClassUID", err), err
    assert "PET series: 2 found; 1 converted, 0 already done, 1 failed, 0 skipped" in out


@pytest.mark.parametrize("cut", ["in the pixel data", "in the header"])
def test_a_pet_with_a_truncated_slice_file_fails(tmp_path, capsys, cut):
    """Cut in the pixel data, the last slice was skipped and the PET converted eleven slices of twelve."""
    root = tmp_path / "export"
    study = _study(root / "a", "CUT", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    whole = study["pet"][-1].read_bytes()
    study["pet"][-1].write_bytes(whole[: len(whole) - 40] if cut == "in the pixel data" else whole[: len(whole) // 2])
    assert _convert(root, tmp_path / "raw") == 1
    out, err = capsys.readouterr()
    reason = r"truncated: pixel data \(7FE0,0010\)" if cut == "in the pixel data" else "truncated or incomplete: an image"
    assert re.search(rf"FAILED CUT_20240101: .*pet_011\.dcm: {reason}.* so it is incomplete", err), err
    assert "0 converted" in out


def test_a_pet_whose_every_file_is_damaged_is_failed_not_vanished(tmp_path, capsys):
    root = tmp_path / "export"
    _study(root / "good", "GOOD", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    gone = _study(root / "gone", "GONE", "20240101", ct_grid="pet", mask="rtstruct-on-pet")
    for path in gone["pet"]:
        path.write_bytes(path.read_bytes()[:-40])
    assert _convert(root, tmp_path / "raw") == 1
    out, err = capsys.readouterr()
    assert re.search(r"FAILED GONE_20240101: .*pet_000\.dcm: truncated: pixel data .*0 readable files and 12 damaged", err), err
    assert "PET series: 2 found; 1 converted, 0 already done, 1 failed, 0 skipped" in out
