"""The dataset writer: case IDs, pseudonyms, splits, atomic and resumable writes, refusals; ``l1dfl suv``/``splits``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import _conversion_helpers as h
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_l1dfl.cli import main
from nnunetv2_l1dfl.conversion import cli as conversion_cli
from nnunetv2_l1dfl.conversion.case_ids import (
    CaseKey,
    PseudonymKey,
    assign_case_ids,
    normalize_study_date,
    sanitize_id_part,
)
from nnunetv2_l1dfl.conversion.dataset_folder import (
    PET_NORMALIZATIONS,
    DatasetSpec,
    LoadedCase,
    is_case_finished,
    prepare_dataset_dir,
    write_case,
)
from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.splits import make_patient_splits


def test_cli_pet_norm_choices_match_the_writer():
    assert conversion_cli.PET_NORM_CHOICES == tuple(PET_NORMALIZATIONS)
    assert conversion_cli.DEFAULT_PET_NORM in PET_NORMALIZATIONS


def test_each_pet_norm_name_selects_its_own_nnunet_normalization():
    """nnU-Net silently falls back to z-score for a channel name it does not know: no choice may."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import (
        get_normalization_scheme,
    )

    expected = {"CT": "CTNormalization", "noNorm": "NoNormalization", "zscore": "ZScoreNormalization",
                "rescale_to_0_1": "RescaleTo01Normalization"}
    assert {name: get_normalization_scheme(name).__name__ for name in PET_NORMALIZATIONS} == expected


@pytest.mark.parametrize(
    ("raw", "safe"),
    [("PAT/001 X", "PAT-001-X"), ("a\\b:c", "a-b-c"), ("pat_0001", "pat-0001"), ("Müller, Jörg", "Muller-Jorg"),
     ("../..", "x"), ("  ", "x")],
)  # fmt: skip
def test_sanitize_id_part(raw, safe):
    assert sanitize_id_part(raw) == safe


def test_normalize_study_date_formats():
    assert normalize_study_date("20240131") == "20240131"
    assert normalize_study_date("2024-01-31") == "20240131"
    assert normalize_study_date("01-31-2024-NA-PET-CT Ganzkoerper  primaer mit KM-10445") == "20240131"
    assert normalize_study_date("not a date") == "" and normalize_study_date(None) == ""


def test_case_ids_are_safe_unique_and_order_independent():
    keys = [
        CaseKey("A/B", "20240101", "s1"),
        CaseKey("A B", "20240101", "s2"),  # sanitizes like A/B: both get a hash of their raw ID
        CaseKey("P1", "20240101", "uid-b"),
        CaseKey("P1", "20240101", "uid-a"),  # same patient, same day: -1/-2 by discriminator
        CaseKey("P1", "", "uid-c"),
        CaseKey("0001", None, "x"),
        CaseKey("0002", None, "y", prefix="fdg"),  # "fdg_0002" would look like channel 0002 of "fdg"
    ]
    ids = assign_case_ids(keys)
    assert ids == assign_case_ids(list(reversed(keys)))
    assert len(set(ids.values())) == len(keys)
    assert (
        ids[keys[0]] != ids[keys[1]]
        and ids[keys[0]].startswith("A-B-")
        and ids[keys[0]].endswith("_20240101")
    )
    assert (ids[keys[3]], ids[keys[2]]) == ("P1_20240101-1", "P1_20240101-2")
    assert ids[keys[4]] == "P1_nodate" and ids[keys[5]] == "0001" and ids[keys[6]] == "fdg-0002"
    for case_id in ids.values():
        assert " " not in case_id and "/" not in case_id
        assert not (len(case_id) > 5 and case_id[-5] == "_" and case_id[-4:].isdigit())


def test_pseudonym_key_is_private_stable_and_extends(tmp_path):
    path = tmp_path / "key.csv"
    key = PseudonymKey(path)
    first = key.assign([CaseKey("MRN 42", "20240301", "study-2"), CaseKey("MRN 42", "20240101", "study-1")])
    key.save()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ids = sorted(first.values())
    assert ids[0].endswith("_s1") and ids[1].endswith("_s2") and ids[0][:-3] == ids[1][:-3]
    assert first[CaseKey("MRN 42", "20240101", "study-1")].endswith("_s1")  # chronological
    reopened = PseudonymKey(path)
    again = reopened.assign(
        [CaseKey("MRN 42", "20240101", "study-1"), CaseKey("MRN 42", "20240601", "study-3")]
    )
    assert again[CaseKey("MRN 42", "20240101", "study-1")] == first[CaseKey("MRN 42", "20240101", "study-1")]
    assert again[CaseKey("MRN 42", "20240601", "study-3")] == ids[0][:-3] + "_s3"
    assert "MRN" not in "".join(again.values())


def test_pseudonym_key_save_that_fails_keeps_the_old_key(tmp_path, monkeypatch):
    path = tmp_path / "key.csv"
    key = PseudonymKey(path)
    key.assign([CaseKey("MRN 42", "20240101", "study-1")])
    key.save()
    before = path.read_text()
    key.assign([CaseKey("MRN 43", "20240101", "study-9")])

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        key.save()
    monkeypatch.undo()
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["key.csv"]


def test_patient_splits_keep_patients_together_and_balance():
    case_patients = {f"c{i}": f"p{i % 7}" for i in range(20)}  # 7 patients, 2-3 studies each
    splits = make_patient_splits(case_patients, n_folds=5)
    assert splits == make_patient_splits(dict(reversed(list(case_patients.items()))), n_folds=5)
    assert sorted(c for s in splits for c in s["val"]) == sorted(case_patients)
    for s in splits:
        assert sorted(s["train"] + s["val"]) == sorted(case_patients)
        patients_val = {case_patients[c] for c in s["val"]}
        assert not patients_val & {case_patients[c] for c in s["train"]}
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 3
    with pytest.raises(ConversionError, match="4 patients cannot fill 5 folds"):
        make_patient_splits({f"c{i}": f"p{i}" for i in range(4)})


def _pet_grid_case(origin=h.PET_ORIGIN, label_values=(1, 1)) -> LoadedCase:
    def image(array, o=h.PET_ORIGIN):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(h.PET_SPACING)
        img.SetOrigin(o)
        return img

    return LoadedCase(
        ct=image(h.ct_volume(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)),
        pet=image(h.pet_suv_volume()),
        label=image(h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN, values=label_values), origin),
        metadata={"study_date": "2024-01-31", "tracer": "FDG"},
    )


def test_write_case_checks_before_writing(tmp_path):
    spec = DatasetSpec(raw_dir=tmp_path, dataset_id=9, name="Unit")
    dataset = prepare_dataset_dir(spec)
    record = write_case(dataset, "ok", _pet_grid_case(), spec.labels, patient="p")
    assert (record["n_lesions"], record["study_date"], record["warnings"]) == (2, "20240131", [])
    assert is_case_finished(dataset, "ok")
    shifted = _pet_grid_case(origin=(h.PET_ORIGIN[0] + 2.0, *h.PET_ORIGIN[1:]))
    with pytest.raises(ConversionError, match=r"case shifted: label is not on the PET grid \(origin"):
        write_case(dataset, "shifted", shifted, spec.labels, patient="p")
    with pytest.raises(ConversionError, match=r"case twolabels: label values \[2\]"):
        write_case(dataset, "twolabels", _pet_grid_case(label_values=(1, 2)), spec.labels, patient="p")
    nan_case = _pet_grid_case()
    nan_pet = sitk.GetArrayFromImage(nan_case.pet)
    nan_pet[3, 4, 5] = np.nan
    nan_case.pet = sitk.GetImageFromArray(nan_pet)
    nan_case.pet.CopyInformation(nan_case.ct)
    with pytest.raises(ConversionError, match="case nan: PET contains NaN"):
        write_case(dataset, "nan", nan_case, spec.labels, patient="p")
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == ["ok_0000.nii.gz", "ok_0001.nii.gz"]
    assert [p.name for p in (dataset / "labelsTr").iterdir()] == ["ok.nii.gz"]


def test_interrupted_run_is_rolled_back_and_resumed(tmp_path, capsys):
    source = h.make_autopet_fdg(tmp_path / "download")
    raw = tmp_path / "raw"
    args = ["convert", "autopet", str(source), "-d", "221", "-n", "AP", "-o", str(raw), "--no-progress"]
    assert main(args) == 0
    dataset = raw / "Dataset221_AP"
    # Simulate a crash while case X was being moved into place: CT and PET there, label not yet.
    case = "fdg_11aa22bb33_20040105"
    (dataset / "labelsTr" / f"{case}.nii.gz").unlink()
    (dataset / ".l1dfl" / "in_progress" / case).write_text("")
    (dataset / ".l1dfl" / "staging" / case).mkdir(parents=True)
    (dataset / ".l1dfl" / "staging" / case / "half.nii.gz").write_bytes(b"\x1f\x8b")
    before = (dataset / "imagesTr" / f"{case}_0000.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "1 converted, 5 already done, 0 failed" in capsys.readouterr().out
    assert is_case_finished(dataset, case) and not (dataset / ".l1dfl" / "staging" / case).exists()
    assert (
        dataset / "imagesTr" / f"{case}_0000.nii.gz"
    ).stat().st_mtime_ns != before  # rewritten, not trusted
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 6
    assert main([*args, "--overwrite"]) == 0
    assert "6 converted, 0 already done" in capsys.readouterr().out
    # Another name for the same ID is refused, and nothing is written.
    assert main([*args[:5], "-n", "Other", *args[7:]]) == 2
    assert (
        "dataset ID 221 is already used" in capsys.readouterr().err
        and not (raw / "Dataset221_Other").exists()
    )


def test_splits_command_writes_into_preprocessed(tmp_path, nnunet_env, capsys):
    source = h.make_autopet_fdg(tmp_path / "download")
    assert main(["convert", "autopet", str(source), "-d", "221", "-n", "AP", "--no-progress"]) == 0
    assert main(["splits", "-d", "221"]) == 0
    path = Path(nnunet_env["nnUNet_preprocessed"]) / "Dataset221_AP" / "splits_final.json"
    assert str(path) in capsys.readouterr().out
    assert len(json.loads(path.read_text())) == 5


@pytest.mark.parametrize("dro", ["DRO_0_0", "DRO_4_2"])  # plain BQML/START, and injection before midnight
def test_suv_command_on_ibsi_dro(ibsi_dro_dir, tmp_path, capsys, dro):
    out = tmp_path / "suv.nii"
    mask_path = ibsi_dro_dir / dro / "mask" / "DRO_mask.nii.gz"
    assert main(["suv", str(ibsi_dro_dir / dro / "PT"), str(out), "--mask", str(mask_path)]) == 0
    printed = capsys.readouterr().out
    assert "SUV branch: BQML|START" in printed and "SUVbw in mask" in printed
    suv = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))[
        sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
    ]
    assert np.allclose([suv.min(), np.median(suv), suv.max()], [0.2, 1.0, 4.0], rtol=5e-3)


def test_place_on_pet_grid_warns_when_lesions_merge():
    from nnunetv2_l1dfl.conversion.resample import place_on_pet_grid

    pet = sitk.Image([4, 3, 3], sitk.sitkFloat32)
    pet.SetSpacing((4.0, 4.0, 4.0))
    pet.SetOrigin((1.5, 1.5, 1.5))
    ct = sitk.Image(pet.GetSize(), sitk.sitkFloat32)
    ct.CopyInformation(pet)
    labels = np.zeros((12, 12, 16), np.uint8)
    labels[4:8, 4:8, 4:7] = 1  # 3/4 of PET voxel (1, 1, 1)
    labels[4:8, 4:8, 8:12] = 1  # all of its neighbour (2, 1, 1), 1 mm away: merges with the first
    label = sitk.GetImageFromArray(labels)  # 1 mm grid at the origin
    _, on_pet, warnings = place_on_pet_grid(ct, label, pet, "c1")
    assert sitk.GetArrayFromImage(on_pet).sum() == 2
    assert warnings == [
        "lesions merged in resampling: 2 lesions before, 1 after on the PET grid (1 merged with a neighbour, 0 lost)"
    ]
    labels[4:8, 4:8, 8:12] = 0
    label = sitk.GetImageFromArray(labels)
    assert place_on_pet_grid(ct, label, pet, "c1")[2] == []
