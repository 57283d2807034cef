"""``l1dfl convert autopet|nifti|hecktor`` on miniature copies of each public layout built by the tests."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import _conversion_helpers as h
import numpy as np
import SimpleITK as sitk

from nnunetv2_l1dfl.cli import main


def _metadata(dataset: Path) -> dict[str, dict[str, str]]:
    with (dataset / "case_metadata.csv").open(newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_autopet_fdg_release_with_splits_and_parallel_workers(tmp_path, nnunet_env, capsys):
    source = h.make_autopet_fdg(tmp_path / "download")
    raw = Path(nnunet_env["nnUNet_raw"])
    code = main(["convert", "autopet", str(source), "-d", "221", "-n", "AutoPETII", "--no-progress", "--write-splits",
                 "-np", "2", "--pet-norm", "noNorm"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    dataset = raw / "Dataset221_AutoPETII"
    rows = _metadata(dataset)
    # Study folders with spaces become <tracer>_<patient>_<YYYYMMDD>; the original is kept as source.
    assert sorted(rows)[:2] == ["fdg_0a1b2c3d4e_20020812", "fdg_0a1b2c3d4e_20030323"] and len(rows) == 6
    row = rows["fdg_0a1b2c3d4e_20020812"]
    assert row["source"].endswith("08-12-2002-NA-PET-CT Ganzkoerper  primaer mit KM-10445")
    assert (row["tracer"], row["scanner"], row["n_lesions"]) == ("FDG", "Biograph 128", "2")
    assert json.loads((dataset / "dataset.json").read_text())["channel_names"] == {"0": "CT", "1": "noNorm"}
    assert (dataset / "source_metadata" / "fdg_metadata.csv").is_file()
    pet = _read(dataset / "imagesTr" / "fdg_0a1b2c3d4e_20020812_0001.nii.gz")
    assert np.array_equal(pet, h.pet_suv_volume())  # SUV copied exactly, float32

    splits = json.loads(
        (Path(nnunet_env["nnUNet_preprocessed"]) / "Dataset221_AutoPETII" / "splits_final.json").read_text()
    )
    assert len(splits) == 5 and sorted(c for s in splits for c in s["val"]) == sorted(rows)
    repeat = {"fdg_0a1b2c3d4e_20020812", "fdg_0a1b2c3d4e_20030323"}
    assert sum(bool(repeat & set(s["val"])) for s in splits) == 1  # both studies of the patient in one fold
    for s in splits:
        assert not set(s["train"]) & set(s["val"])


def test_autopet_iii_release_tracer_selection(tmp_path, capsys):
    source = h.make_autopet_iii(tmp_path / "download")
    raw = tmp_path / "raw"
    assert main(["convert", "autopet", str(source), "-d", "224", "-n", "PSMA", "-o", str(raw), "--tracer", "psma",
                 "--no-progress"]) == 0  # fmt: skip
    assert "l1dfl splits -d 224" in capsys.readouterr().out  # splits not requested: the command is printed
    rows = _metadata(raw / "Dataset224_PSMA")
    assert sorted(rows) == [
        "psma_95b833d46f153cd2_20180416",
        "psma_95b833d46f153cd2_20190201",
        "psma_a1b2c3d4e5f60718_20171130",
    ]
    assert rows["psma_95b833d46f153cd2_20180416"]["tracer"] == "PSMA (68Ga)"
    assert rows["psma_95b833d46f153cd2_20190201"]["scanner"] == "Discovery 690"
    assert main(["convert", "autopet", str(source), "-d", "225", "-n", "FDG", "-o", str(raw), "--tracer", "fdg",
                 "--no-progress", "--release", "iii"]) == 0  # fmt: skip
    # The same study gets the same case ID as from the autoPET I/II release.
    assert list(_metadata(raw / "Dataset225_FDG")) == ["fdg_0a1b2c3d4e_20020812"]


def test_nifti_folders_resample_and_suv_from_manifest(tmp_path):
    source = tmp_path / "cases"
    pet_bqml_per_suv = 5000.0
    # "Patient 1": CT on its own, smaller grid; PET in SUV; mask on the CT grid.
    h.write_image(h.ct_volume(), source / "Patient 1" / "CT.nii.gz", h.CT_SPACING, h.CT_ORIGIN)
    h.write_image(h.pet_suv_volume(), source / "Patient 1" / "suv.nii.gz", h.PET_SPACING, h.PET_ORIGIN)
    h.write_image(
        h.lesion_mask(h.CT_SHAPE, h.CT_SPACING, h.CT_ORIGIN),
        source / "Patient 1" / "seg.nii.gz",
        h.CT_SPACING,
        h.CT_ORIGIN,
    )
    # "p2_0001": PET in Bq/ml with the SUV values in the manifest; a mask with two lesion values.
    h.write_pet_grid_case(
        source / "p2_0001", {"ct": "ct.nii.gz", "pet": "pet.nii.gz", "label": "mask.nii.gz"}
    )
    bqml = h.pet_suv_volume() * pet_bqml_per_suv
    h.write_image(bqml, source / "p2_0001" / "pet.nii.gz", h.PET_SPACING, h.PET_ORIGIN)
    h.write_image(h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN, values=(1, 2)), source / "p2_0001" / "mask.nii.gz",
                  h.PET_SPACING, h.PET_ORIGIN)  # fmt: skip
    # A folder with two PET candidates fails with the file names.
    h.write_pet_grid_case(
        source / "ambiguous", {"ct": "ct.nii.gz", "pet": "pet_a.nii.gz", "label": "mask.nii.gz"}
    )
    h.write_image(h.pet_suv_volume(), source / "ambiguous" / "pet_b.nii.gz", h.PET_SPACING, h.PET_ORIGIN)
    raw = tmp_path / "raw"
    assert (
        main(["convert", "nifti", str(source), "-d", "301", "-n", "Folders", "-o", str(raw), "--no-progress",
              "--allow-implausible-suv"])  # fmt: skip
        == 1
    )
    rows = _metadata(raw / "Dataset301_Folders")
    assert set(rows) == {"Patient-1", "p2-0001"}  # sanitized: no space, no _XXXX channel-like ending
    assert "CT not covering PET" in rows["Patient-1"]["warnings"]
    assert rows["p2-0001"]["n_lesions"] == "2"  # both lesion values merged into label 1, still two lesions
    assert "implausible SUV" in rows["p2-0001"]["warnings"]  # Bq/ml read as SUV is flagged (accepted on request)
    label = _read(raw / "Dataset301_Folders" / "labelsTr" / "Patient-1.nii.gz")
    assert label.shape == h.PET_SHAPE and set(np.unique(label)) == {0, 1}

    manifest = tmp_path / "manifest.csv"
    weight, dose, half_life, minutes = 70.0, 2.0e8, 6586.2, 60.0
    manifest.write_text(
        "case,patient,ct,pet,mask,pet_units,weight_kg,injected_dose_mbq,half_life_s,injection_to_reference_s\n"
        f"p2,P2,cases/p2_0001/ct.nii.gz,cases/p2_0001/pet.nii.gz,cases/p2_0001/mask.nii.gz,BQML,{weight},{dose / 1e6},{half_life},{minutes * 60}\n"
    )
    assert main(["convert", "nifti", str(source), "-d", "302", "-n", "Manifest", "-o", str(raw), "--no-progress",
                 "--manifest", str(manifest)]) == 0  # fmt: skip
    suv = _read(raw / "Dataset302_Manifest" / "imagesTr" / "p2_0001.nii.gz")
    expected = bqml * weight * 1000 / (dose * 2 ** (-minutes * 60 / half_life))
    assert np.allclose(suv, expected, rtol=1e-5)
    assert _metadata(raw / "Dataset302_Manifest")["p2"]["suv_branch"].startswith("BQML x ")


def test_hecktor_layout_two_labels_on_pet_grid(tmp_path):
    source = tmp_path / "hecktor" / "training"
    for case in ("CHUM-001", "MDA-012"):
        h.write_image(h.ct_volume(), source / "imagesTr" / f"{case}__CT.nii.gz", h.CT_SPACING, h.CT_ORIGIN)
        h.write_image(
            h.pet_suv_volume(), source / "imagesTr" / f"{case}__PT.nii.gz", h.PET_SPACING, h.PET_ORIGIN
        )
        h.write_image(h.lesion_mask(h.CT_SHAPE, h.CT_SPACING, h.CT_ORIGIN, values=(1, 2)), source / "labelsTr" / f"{case}.nii.gz",
                      h.CT_SPACING, h.CT_ORIGIN)  # fmt: skip
    h.write_image(
        h.pet_suv_volume(), source / "imagesTs" / "CHUP-099__PT.nii.gz", h.PET_SPACING, h.PET_ORIGIN
    )  # no CT, no label
    raw = tmp_path / "raw"
    assert main(["convert", "hecktor", str(source), "-d", "602", "-n", "HECKTOR", "-o", str(raw), "--no-progress",
                 "--allow-failures"]) == 0  # fmt: skip
    dataset = raw / "Dataset602_HECKTOR"
    assert json.loads((dataset / "dataset.json").read_text())["labels"] == {
        "background": 0,
        "GTVp": 1,
        "GTVn": 2,
    }
    rows = _metadata(dataset)
    assert set(rows) == {"CHUM-001", "MDA-012"} and rows["CHUM-001"]["scanner"] == "centre CHUM"
    label = _read(dataset / "labelsTr" / "CHUM-001.nii.gz")
    assert label.shape == h.PET_SHAPE and set(np.unique(label)) == {0, 1, 2}
    ct = sitk.ReadImage(str(dataset / "imagesTr" / "CHUM-001_0000.nii.gz"))
    assert ct.GetSize() == h.PET_SHAPE[::-1] and np.allclose(ct.GetSpacing(), h.PET_SPACING)


def test_clear_errors_for_unknown_layout_and_missing_output(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        ["convert", "autopet", str(tmp_path / "empty"), "-d", "1", "-n", "X", "-o", str(tmp_path / "raw")]
    )
    assert code == 2 and "looks like neither autoPET release" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_raw", raising=False)
    source = h.make_autopet_fdg(tmp_path / "download")
    assert main(["convert", "autopet", str(source), "-d", "1", "-n", "X"]) == 2
    assert "pass -o RAW_DIR or set the environment variable nnUNet_raw" in capsys.readouterr().err


def _nifti_case(folder: Path, mask: np.ndarray, ct_origin=h.CT_ORIGIN) -> None:
    h.write_image(h.ct_volume(), folder / "ct.nii.gz", h.CT_SPACING, ct_origin)
    h.write_image(h.pet_suv_volume(), folder / "suv.nii.gz", h.PET_SPACING, h.PET_ORIGIN)
    h.write_image(mask, folder / "seg.nii.gz", h.PET_SPACING, h.PET_ORIGIN)


def _convert_nifti(source: Path, raw: Path, dataset_id: int, *flags: str) -> int:
    return main(["convert", "nifti", str(source), "-d", str(dataset_id), "-n", "Masks", "-o", str(raw), "--no-progress",
                 *flags])  # fmt: skip


def test_nifti_fractional_mask_refused_or_thresholded_on_request(tmp_path, capsys):
    """A 0.5-valued mask was cast to 0: a lesion-free case written with exit code 0."""
    lesions = h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN).astype(np.float32)
    _nifti_case(tmp_path / "cases" / "soft", 0.5 * lesions)
    raw = tmp_path / "raw"
    assert _convert_nifti(tmp_path / "cases", raw, 311) == 1
    err = capsys.readouterr().err
    assert re.search(r"FAILED soft: .*soft/seg.nii.gz: mask values are not integers \(0.5; \d+ voxels\).*--mask-threshold", err)
    assert not (raw / "Dataset311_Masks" / "labelsTr" / "soft.nii.gz").exists()
    assert _convert_nifti(tmp_path / "cases", raw, 312, "--mask-threshold", "0.5") == 0
    label = _read(raw / "Dataset312_Masks" / "labelsTr" / "soft.nii.gz")
    np.testing.assert_array_equal(label, lesions.astype(np.uint8))
    assert "thresholded at 0.5" in _metadata(raw / "Dataset312_Masks")["soft"]["warnings"]


def test_nifti_ct_outside_the_pet_and_lost_lesion_fail_unless_allowed(tmp_path, capsys):
    mask = h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)
    _nifti_case(tmp_path / "far" / "c1", mask, ct_origin=(-31.0, -31.0, 900.0))
    raw = tmp_path / "raw"
    assert _convert_nifti(tmp_path / "far", raw, 313) == 1
    assert re.search(r"FAILED c1: case c1: CT not covering PET: CT .*c1/ct.nii.gz covers 0.0% of the PET activity",
                     capsys.readouterr().err)  # fmt: skip
    assert _convert_nifti(tmp_path / "far", raw, 314, "--allow-partial-ct") == 0
    assert "CT not covering PET (--allow-partial-ct)" in _metadata(raw / "Dataset314_Masks")["c1"]["warnings"]

    # A lesion drawn on a mask grid that reaches beyond the PET: the part outside is a lost lesion.
    beyond = np.zeros((h.PET_SHAPE[0] + 6,) + h.PET_SHAPE[1:], np.uint8)
    beyond[: h.PET_SHAPE[0]] = mask
    beyond[-3:, 6:9, 6:9] = 1  # 12-16 mm above the PET's last slice
    folder = tmp_path / "lost" / "c2"
    _nifti_case(folder, mask)
    h.write_image(beyond, folder / "seg.nii.gz", h.PET_SPACING, h.PET_ORIGIN)
    assert _convert_nifti(tmp_path / "lost", raw, 315) == 1
    assert re.search(r"FAILED c2: lesion loss: .*c2/seg.nii.gz: label 'value 1': 1 of 3 lesion\(s\) lie outside the PET grid",
                     capsys.readouterr().err)  # fmt: skip
    assert _convert_nifti(tmp_path / "lost", raw, 316, "--allow-lesion-loss") == 0
    row = _metadata(raw / "Dataset316_Masks")["c2"]
    assert "lesion loss accepted (--allow-lesion-loss)" in row["warnings"] and row["n_lesions"] == "2"


def test_autopet_pet_in_bq_ml_fails_unless_implausible_suv_is_allowed(tmp_path, capsys):
    """A PET channel that is really Bq/ml (SUVmax in the thousands) is refused; the opt-in records it."""
    source = h.make_autopet_iii(tmp_path / "download")
    pet_path = source / "imagesTr" / "psma_a1b2c3d4e5f60718_2017-11-30_0001.nii.gz"
    pet = sitk.ReadImage(str(pet_path))
    sitk.WriteImage(pet * 5000.0, str(pet_path), useCompression=True)  # Bq/ml, not SUV
    raw = tmp_path / "raw"
    args = ["convert", "autopet", str(source), "-d", "226", "-n", "PSMA", "-o", str(raw), "--tracer", "psma",
            "--no-progress"]  # fmt: skip
    assert main(args) == 1
    out = capsys.readouterr()
    assert "psma_a1b2c3d4e5f60718_20171130" in out.out + out.err and "implausible SUV" in out.out + out.err
    assert "psma_a1b2c3d4e5f60718_20171130" not in _metadata(raw / "Dataset226_PSMA")
    assert main([*args, "--allow-implausible-suv"]) == 0
    row = _metadata(raw / "Dataset226_PSMA")["psma_a1b2c3d4e5f60718_20171130"]
    assert "implausible SUV accepted (--allow-implausible-suv)" in row["warnings"]


def test_hecktor_pet_in_bq_ml_fails_unless_implausible_suv_is_allowed(tmp_path, capsys):
    source = tmp_path / "hecktor" / "training"
    h.write_image(h.ct_volume(), source / "imagesTr" / "CHUM-001__CT.nii.gz", h.CT_SPACING, h.CT_ORIGIN)
    h.write_image(h.pet_suv_volume() * 5000.0, source / "imagesTr" / "CHUM-001__PT.nii.gz", h.PET_SPACING,
                  h.PET_ORIGIN)  # Bq/ml read as SUV  # fmt: skip
    h.write_image(h.lesion_mask(h.CT_SHAPE, h.CT_SPACING, h.CT_ORIGIN), source / "labelsTr" / "CHUM-001.nii.gz",
                  h.CT_SPACING, h.CT_ORIGIN)  # fmt: skip
    raw = tmp_path / "raw"
    args = ["convert", "hecktor", str(source), "-d", "603", "-n", "HECKTOR", "-o", str(raw), "--no-progress"]
    assert main(args) == 1
    assert "implausible SUV" in "".join(capsys.readouterr())
    assert main([*args, "--allow-implausible-suv"]) == 0
    row = _metadata(raw / "Dataset603_HECKTOR")["CHUM-001"]
    assert "implausible SUV accepted (--allow-implausible-suv)" in row["warnings"]
