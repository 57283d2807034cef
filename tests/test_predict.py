"""``l1dfl predict`` end to end: phantom DICOM studies -> a tiny trained model -> DICOM SEG, RTSTRUCT, report.

One model is trained once for the module (6 small phantom studies, ``l1dfl convert dicom``'s
converter, nnU-Net's 3d_fullres plan capped as the demo caps it on CPU, 1 epoch of 2 iterations of
``nnUNetTrainerL1DFL`` through a schedule subclass, fold 0). nnU-Net's own commands run in
subprocesses (as in test_nnunet_integration); ``l1dfl predict`` runs in-process from the checkout.
The tiny model may predict lesions or not: the DICOM outputs are checked whenever they exist, and
the writers are checked on hand-made lesions in test_predict_outputs.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_l1dfl.cli import main as l1dfl_main

pytestmark = pytest.mark.slow

DATASET_ID = "977"
DATASET = "Dataset977_PredictTest"
CONFIG = "3d_fullres"
N_STUDIES = 6


def clean_env(extra: dict) -> dict:
    env = {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8", "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }  # fmt: skip
    env.update(extra)
    return env


def run(cmd: list[str], env: dict, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Phantom cohort, converted dataset and a tiny model of ours trained on fold 0 (once per module)."""
    from dataset_conversion.dicom_petct import convert_dicom_petct
    from nnunetv2_l1dfl.demo import cap_3d_fullres_plans
    from nnunetv2_l1dfl.phantom.generate import generate_cohort
    from nnunetv2_l1dfl.training.schedules import write_schedule_trainers

    root = tmp_path_factory.mktemp("predict")
    paths = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in paths.values():
        folder.mkdir()
    generate_cohort(root / "phantom", n_cases=N_STUDIES, seed=0, size="small", progress=False)
    summary, _, _ = convert_dicom_petct(root / "phantom" / "dicom", int(DATASET_ID), "PredictTest",
                                        raw_dir=paths["nnUNet_raw"], progress=False)
    assert not summary.failed, summary.failed
    trainer_dir = root / "trainers"
    trainer = write_schedule_trainers(trainer_dir, num_epochs=1, iterations_per_epoch=2, val_iterations=1,
                                      suffix="predicttest", bases=("nnUNetTrainerL1DFL",))["nnUNetTrainerL1DFL"]
    env = clean_env({**{k: str(v) for k, v in paths.items()}, "nnUNet_extTrainer": str(trainer_dir)})
    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", CONFIG, "-np", "1", "-npfp", "1"], env, root)
    cap_3d_fullres_plans(paths["nnUNet_preprocessed"] / DATASET / "nnUNetPlans.json", 32, 8)
    run(["nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", trainer, "-device", "cpu"], env, root)
    folder = paths["nnUNet_results"] / DATASET / f"{trainer}__nnUNetPlans__{CONFIG}"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()

    # Two studies to predict, as a user's DICOM folder (the model saw them; what matters here is the I/O).
    studies = sorted(p for p in (root / "phantom" / "dicom").glob("*/*") if p.is_dir())[:2]
    dicom_in = root / "dicom_in"
    for study in studies:
        shutil.copytree(study, dicom_in / study.parent.name / study.name)
    # The same two studies as converted NIfTI, in imagesTs layout.
    metadata = (paths["nnUNet_raw"] / DATASET / "case_metadata.csv").read_text(encoding="utf-8")
    nifti_in = root / "nifti_in"
    nifti_in.mkdir()
    mp = pytest.MonkeyPatch()
    for name, value in paths.items():
        mp.setenv(name, str(value))
    mp.setenv("nnUNet_extTrainer", str(trainer_dir) + os.pathsep + os.environ.get("nnUNet_extTrainer", ""))
    yield {"root": root, "paths": paths, "env": env, "trainer": trainer, "folder": folder, "dicom_in": dicom_in,
           "nifti_in": nifti_in, "metadata": metadata, "trainer_dir": trainer_dir}  # fmt: skip
    mp.undo()


def predict(args: list[str], capsys) -> tuple[int, str, str]:
    code = l1dfl_main(["predict", *args, "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_args(model: dict) -> list[str]:
    return ["-d", DATASET_ID, "-c", CONFIG, "-tr", model["trainer"]]


def _case_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def _pet_headers(study_dir: Path):
    import pydicom

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((study_dir / "PET").iterdir())]
    return {h.SOPInstanceUID: h for h in headers}


@pytest.fixture(scope="module")
def dicom_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom_out") / "out"
    code = l1dfl_main(["predict", str(model["dicom_in"]), "-o", str(out), *model_args(model), "--device", "cpu",
                       "--no-progress", "--disable-tta"])  # fmt: skip
    return code, out


def test_dicom_study_outputs_match_the_prediction_and_the_source_pet(model, dicom_run):
    import highdicom as hd
    import pydicom

    from nnunetv2_l1dfl.conversion.masks import rasterize_rtstruct
    from nnunetv2_l1dfl.evaluation.metrics import label_lesions

    code, out = dicom_run
    assert code == 0
    cases = _case_folders(out)
    assert len(cases) == 2 and all(c.name.startswith("study-") for c in cases)
    pet_by_series = {}
    for study in model["dicom_in"].glob("*/*"):
        headers = _pet_headers(study)
        pet_by_series[next(iter(headers.values())).SeriesInstanceUID] = headers
    for case in cases:
        report = json.loads((case / "lesions.json").read_text())
        assert report["case_id"] == case.name
        for name in ("prediction.nii.gz", "lesions.nii.gz", "lesions.csv", "mip.png"):
            assert (case / name).is_file(), name
        headers = pet_by_series[report["input"]["pet_series_instance_uid"]]
        prediction = sitk.ReadImage(str(case / "prediction.nii.gz"))
        label = sitk.GetArrayFromImage(prediction)
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lesions.nii.gz")))
        expected, n = label_lesions(label > 0, connectivity=18)
        assert np.array_equal(instances, expected) and report["patient"]["n_lesions"] == n == len(report["lesions"])
        assert prediction.GetSize()[2] == len(headers)
        if n == 0:
            assert report["outputs"]["seg.dcm"] == report["outputs"]["rtstruct.dcm"] == "not written: no lesion predicted"
            assert not (case / "seg.dcm").exists() and not (case / "rtstruct.dcm").exists()
            continue
        # SEG: highdicom reads it back, PET slice by PET slice, equal to prediction.nii.gz.
        seg = hd.seg.segread(case / "seg.dcm")
        order = sorted(headers.values(), key=lambda h: prediction.TransformPhysicalPointToIndex(
            [float(v) for v in h.ImagePositionPatient])[2])  # fmt: skip
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[h.SOPInstanceUID for h in order], combine_segments=True,
        )  # fmt: skip
        assert np.array_equal(np.asarray(pixels), label)
        for ds in (pydicom.dcmread(case / "seg.dcm"), pydicom.dcmread(case / "rtstruct.dcm")):
            for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                            "StudyDate", "AccessionNumber"):
                assert str(ds.get(keyword, "")) == str(order[0].get(keyword, "")), keyword
        seg_ds = pydicom.dcmread(case / "seg.dcm")
        assert seg_ds.FrameOfReferenceUID == order[0].FrameOfReferenceUID
        assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == order[0].SeriesInstanceUID
        # RTSTRUCT: the project's reader rasterizes each ROI back onto the PET grid.
        for k in range(1, n + 1):
            image, rois = rasterize_rtstruct(case / "rtstruct.dcm", prediction, roi_pattern=f"^Lesion {k}$")
            assert rois == [f"Lesion {k}"]
            got, want = sitk.GetArrayFromImage(image) > 0, instances == k
            assert 2 * (got & want).sum() / (got.sum() + want.sum()) >= 0.95


def test_rerun_skips_finished_studies_and_overwrite_redoes_them(model, dicom_run, capsys):
    code, out = dicom_run
    assert code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("lesions.json")}
    code, stdout, _ = predict([str(model["dicom_in"]), "-o", str(out), *model_args(model)], capsys)
    assert code == 0 and "0 predicted" in stdout and "2 already done" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("lesions.json")} == before
    code, stdout, _ = predict([str(model["dicom_in"]), "-o", str(out), *model_args(model), "--overwrite", "--disable-tta",
                               "--series-uid", json.loads(next(iter(before)).read_text())["input"]["pet_series_instance_uid"]],
                              capsys)  # fmt: skip
    assert code == 0 and "1 predicted" in stdout
    assert sum(before[p] != p.stat().st_mtime_ns for p in before) == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "partial folders left behind"


def test_predictor_equals_nnunetv2_predict_and_the_dicom_path(model, dicom_run, tmp_path, capsys):
    """On converted NIfTI our predictor gives exactly nnUNetv2_predict's labels; the DICOM path gives the same."""
    from nnunetv2_l1dfl.evaluation.quantities import lesion_quantities

    code, dicom_out = dicom_run
    raw = model["paths"]["nnUNet_raw"] / DATASET / "imagesTr"
    rows = csv.DictReader(io.StringIO(model["metadata"]))
    by_series = {row["source"].split(" / ")[0].removeprefix("PET "): row["case_id"] for row in rows}
    images = tmp_path / "imagesTs"
    images.mkdir()
    pairs = {}
    for case in _case_folders(dicom_out):
        uid = json.loads((case / "lesions.json").read_text())["input"]["pet_series_instance_uid"]
        converted = by_series[uid]
        pairs[converted] = case
        for channel in ("0000", "0001"):
            shutil.copy(raw / f"{converted}_{channel}.nii.gz", images)
    out = tmp_path / "ours"
    code, stdout, stderr = predict([str(images), "-o", str(out), *model_args(model), "-f", "0", "--disable-tta"], capsys)
    assert code == 0, stderr
    reference = tmp_path / "reference"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(reference), "-d", DATASET_ID, "-c", CONFIG, "-tr",
         model["trainer"], "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], model["env"],
        tmp_path)  # fmt: skip
    for converted, dicom_case in pairs.items():
        ours = sitk.ReadImage(str(out / converted / "prediction.nii.gz"))
        theirs = sitk.ReadImage(str(reference / f"{converted}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
        assert ours.GetSpacing() == theirs.GetSpacing() and ours.GetOrigin() == theirs.GetOrigin()
        from_dicom = sitk.ReadImage(str(dicom_case / "prediction.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(ours))
        report = json.loads((out / converted / "lesions.json").read_text())
        assert report["outputs"]["seg.dcm"].startswith("not written: NIfTI input")
        # The report's numbers are the shared definitions applied to the written maps and the SUV.
        pet = sitk.ReadImage(str(images / f"{converted}_0001.nii.gz"))
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(out / converted / "lesions.nii.gz")))
        q = lesion_quantities(instances, sitk.GetArrayFromImage(pet), pet.GetSpacing()[::-1])
        assert [row["lesion_id"] for row in report["lesions"]] == q.label.tolist()
        for row, suv_max, suv_peak, tlg in zip(report["lesions"], q.suv_max, q.suv_peak, q.tlg):
            assert row["suv_max"] == pytest.approx(suv_max, abs=1e-4) and row["tlg"] == pytest.approx(tlg, abs=1e-4)
            assert row["suv_peak"] == pytest.approx(suv_peak, abs=1e-4)


def test_exported_zip_predicts_directly_and_after_installation_into_a_clean_results_folder(
    model, dicom_run, tmp_path, capsys, monkeypatch
):
    _, dicom_out = dicom_run
    zip_path = tmp_path / "model.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", DATASET_ID, "-o", str(zip_path), "-c", CONFIG, "-tr",
         model["trainer"], "-f", "0"], model["env"], tmp_path)  # fmt: skip
    case = _case_folders(dicom_out)[0]
    uid = json.loads((case / "lesions.json").read_text())["input"]["pet_series_instance_uid"]
    one = ["--series-uid", uid]  # one study, with mirroring TTA (nnU-Net's default)

    code, _, stderr = predict([str(model["dicom_in"]), "-o", str(tmp_path / "from_zip"), "-m", str(zip_path), *one],
                              capsys)  # fmt: skip
    assert code == 0, stderr
    assert [p.name for p in tmp_path.joinpath("from_zip").iterdir()] == [case.name], "extracted model left behind"

    clean = tmp_path / "clean_results"
    clean.mkdir()
    run(["nnUNetv2_install_pretrained_model_from_zip", str(zip_path)], {**model["env"], "nnUNet_results": str(clean)},
        tmp_path)  # fmt: skip
    monkeypatch.setenv("nnUNet_results", str(clean))
    code, _, stderr = predict([str(model["dicom_in"]), "-o", str(tmp_path / "installed"), *model_args(model), *one],
                              capsys)  # fmt: skip
    assert code == 0, stderr
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f / case.name / "prediction.nii.gz")))
              for f in ("from_zip", "installed")]  # fmt: skip
    assert np.array_equal(labels[0], labels[1])
    for folder in ("from_zip", "installed"):
        report = json.loads((tmp_path / folder / case.name / "lesions.json").read_text())
        assert report["model"]["mirroring"] is True and report["model"]["folds"] == [0]


def _one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_study_without_pet_fails_alone_and_the_batch_goes_on(model, tmp_path, capsys):
    source = next(p for p in model["dicom_in"].glob("*/*"))
    batch = tmp_path / "batch"
    shutil.copytree(source, batch / "good")
    shutil.copytree(model["root"] / "phantom" / "dicom", tmp_path / "all")
    ct_only = next(p for p in (tmp_path / "all").glob("*/*") if p.name != source.name or p.parent.name != source.parent.name)
    shutil.copytree(ct_only / "CT", batch / "ct_only" / "CT")
    out = tmp_path / "out"
    code, stdout, stderr = predict([str(batch), "-o", str(out), *model_args(model), "--disable-tta"], capsys)
    _one_line_error(code, stderr, "FAILED study-", "no PET series")
    assert code == 1 and "1 predicted" in stdout and "1 failed" in stdout
    assert len(_case_folders(out)) == 1

    code, stdout, stderr = predict([str(batch / "ct_only"), "-o", str(tmp_path / "out2"), *model_args(model)], capsys)
    _one_line_error(code, stderr, "no PET series")
    assert not (tmp_path / "out2").exists() or not _case_folders(tmp_path / "out2")


def test_bad_models_and_outputs_are_one_line_errors_with_nothing_written(model, tmp_path, capsys):
    no_checkpoint = tmp_path / "no_checkpoint" / model["folder"].name
    shutil.copytree(model["folder"], no_checkpoint, ignore=shutil.ignore_patterns("*.pth"))
    out = tmp_path / "out"
    code, _, stderr = predict([str(model["dicom_in"]), "-o", str(out), "-m", str(no_checkpoint)], capsys)
    _one_line_error(code, stderr, "no checkpoint")
    assert not _case_folders(out) and not list(out.glob(".*"))

    three = tmp_path / "three_channels" / model["folder"].name
    shutil.copytree(model["folder"], three)
    dataset_json = json.loads((three / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "CT", "1": "noNorm", "2": "MR"}
    dataset_json.pop("channel_modalities", None)
    (three / "dataset.json").write_text(json.dumps(dataset_json))
    code, _, stderr = predict([str(model["dicom_in"]), "-o", str(out), "-m", str(three)], capsys)
    _one_line_error(code, stderr, "3 input channel(s)")
    assert not _case_folders(out)

    code, _, stderr = predict([str(model["dicom_in"]), "-o", str(out), *model_args(model), "-f", "3"], capsys)
    _one_line_error(code, stderr, "fold 3")

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, stderr = predict([str(model["dicom_in"]), "-o", str(blocker / "out"), *model_args(model)], capsys)
    _one_line_error(code, stderr, "not writable")
