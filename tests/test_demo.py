"""``l1dfl demo``: the reduced workflow end to end, and its stage machinery.

The end-to-end test runs the real stages (phantom DICOM -> ``l1dfl convert dicom`` ->
``nnUNetv2_plan_and_preprocess`` -> ``nnUNetv2_train`` for the stock and the L1DFL trainer ->
``l1dfl compare`` -> ``l1dfl predict`` on a held-out study) on 6 small studies with 3 iterations of
the CPU default (2d), one fold, on CPU.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_l1dfl.cli import main as l1dfl_main
from nnunetv2_l1dfl.demo import (
    DemoConfig,
    DemoStageError,
    WorkFolder,
    _check_config,
    cap_3d_fullres_plans,
    cap_plans,
    run_logged,
    subprocess_environment,
)

REDUCED = ["--cases", "6", "--heldout", "1", "--size", "small", "--epochs", "1", "--iterations", "3",
           "--val-iterations", "1", "--folds", "0", "--device", "cpu", "--no-progress"]
TRAINERS = ("nnUNetTrainer_demo", "nnUNetTrainerL1DFL_demo")


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path, monkeypatch, capsys):
    # The user's nnU-Net folders must stay untouched: point them somewhere the demo must not write.
    user = tmp_path / "user_nnunet"
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (user / name).mkdir(parents=True)
        monkeypatch.setenv(name, str(user / name))
    workdir = tmp_path / "demo"
    assert l1dfl_main(["demo", "--workdir", str(workdir), *REDUCED]) == 0
    out = capsys.readouterr().out
    assert "| Trainer |" in out and all(t in out for t in TRAINERS) and "report.md" in out
    assert "not a verdict on the loss" in out and "seg.dcm (DICOM SEG)" in out
    assert not any(p.is_file() for p in user.rglob("*")), "the user's nnU-Net folders were written to"

    # Dataset.
    dataset = workdir / "nnUNet_raw" / "Dataset901_L1DFLPhantom"
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 6 and set(dataset_json["channel_names"]) == {"0", "1"}
    assert len(list((dataset / "labelsTr").glob("*.nii.gz"))) == 6
    preprocessed = workdir / "nnUNet_preprocessed" / "Dataset901_L1DFLPhantom"
    splits = json.loads((preprocessed / "splits_final.json").read_text())
    assert len(splits) == 5

    # Plans: the CPU default trains the 2d configuration, capped at 8 slices per batch and width 16.
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    config = plans["configurations"]["2d"]
    assert config["architecture"]["arch_kwargs"]["features_per_stage"][0] == 16
    assert len(config["patch_size"]) == 2 and config["batch_size"] == 8  # nnU-Net plans 11 for these images
    assert plans["l1dfl_demo_cap"]["configuration"] == "2d"
    assert (preprocessed / "nnUNetPlans_2d").is_dir() and not (preprocessed / "nnUNetPlans_3d_fullres").exists()
    trainer_module = (workdir / "trainers" / "l1dfl_schedule_trainers_demo.py").read_text()
    assert trainer_module.count("self.oversample_foreground_percent = 0.5") == 2  # both trainers alike

    # Both trainers: checkpoints and validation predictions (with probabilities) of fold 0.
    val_cases = sorted(splits[0]["val"])
    for trainer in TRAINERS:
        fold = workdir / "nnUNet_results" / "Dataset901_L1DFLPhantom" / f"{trainer}__nnUNetPlans__2d" / "fold_0"
        import torch

        checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == trainer and checkpoint["network_weights"]
        for case in val_cases:
            pred = sitk.ReadImage(str(fold / "validation" / f"{case}.nii.gz"))
            label = sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz"))
            assert pred.GetSize() == label.GetSize()
            assert set(np.unique(sitk.GetArrayViewFromImage(pred))) <= {0, 1}
            assert "probabilities" in np.load(fold / "validation" / f"{case}.npz")
        assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]

    # Report.
    report = workdir / "report"
    with (report / "cases.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["case_id"], r["trainer"]) for r in rows) == sorted((c, t) for c in val_cases for t in TRAINERS)
    assert all(r["dice"] != "" for r in rows)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["trainers"] == list(TRAINERS)
    text = (report / "report.md").read_text()
    assert all(t in text for t in TRAINERS)
    figures = list(report.rglob("*.png"))
    assert figures and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures)

    # Predict: the held-out study (a patient not in the dataset) went DICOM in, DICOM SEG out.
    import pydicom

    cohort = json.loads((workdir / "phantom" / "phantom_cohort.json").read_text())
    (held,) = cohort["heldout_studies"]
    assert held["patient_id"] not in {s["patient_id"] for s in cohort["studies"]}
    assert not any(held["patient_id"] in p.name for p in (dataset / "imagesTr").iterdir())
    (study,) = [p for p in (workdir / "predict").iterdir() if p.is_dir() and not p.name.startswith(".")]
    seg = pydicom.dcmread(study / "seg.dcm")
    pet = pydicom.dcmread(next((workdir / "phantom" / held["dicom"] / "PET").glob("*.dcm")))
    assert seg.Modality == "SEG" and seg.PatientID == pet.PatientID == held["patient_id"]
    assert seg.StudyInstanceUID == pet.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pet.SeriesInstanceUID
    assert (study / "lesions.csv").is_file() and (study / "rtstruct.dcm").is_file()
    assert str(workdir / "predict") in out

    # Every stage left its marker and its log; a re-run continues (nothing left to do) and is quick.
    work = WorkFolder(workdir)
    stages = ["phantom", "convert", "plan", *(f"train_{t}_fold0" for t in TRAINERS), "compare", "predict"]
    assert all(work.done(s) for s in stages) and all(work.log(s).is_file() for s in stages)
    start = time.perf_counter()
    assert l1dfl_main(["demo", "--workdir", str(workdir), *REDUCED]) == 0
    assert time.perf_counter() - start < 60
    # Other data settings in the same work folder are refused, naming what differs.
    assert l1dfl_main(["demo", "--workdir", str(workdir), *REDUCED[:-1], "--seed", "5", "--no-progress"]) == 1
    assert "seed: 0 -> 5" in capsys.readouterr().err


def test_failed_stage_names_stage_and_log(tmp_path):
    log = tmp_path / "logs" / "convert.log"
    cmd = [sys.executable, "-c", "import sys; print('reading DICOM'); print('no PET series found'); sys.exit(3)"]
    seen = []
    with pytest.raises(DemoStageError) as info:
        run_logged("convert", cmd, {"PATH": ""}, log, seen.append)
    message = str(info.value)
    assert "stage 'convert' failed" in message and "exit code 3" in message and str(log) in message
    assert "no PET series found" in message
    assert log.read_text().startswith("==== ") and "\n$ " in log.read_text() and "reading DICOM" in log.read_text()
    assert [s.strip() for s in seen] == ["reading DICOM", "no PET series found"]
    with pytest.raises(DemoStageError):  # a second attempt appends: the first one's output is kept
        run_logged("convert", cmd, {"PATH": ""}, log)
    assert log.read_text().splitlines().count("no PET series found") == 2


def test_work_folder_rules_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/users/own/raw")
    cfg = DemoConfig(workdir=tmp_path / "w", cases=6)
    work = WorkFolder(cfg.workdir)
    _check_config(cfg, work)
    _check_config(cfg, work)  # same settings: fine
    with pytest.raises(DemoStageError, match="cases: 6 -> 7"):
        _check_config(DemoConfig(workdir=cfg.workdir, cases=7), work)
    _check_config(DemoConfig(workdir=cfg.workdir, cases=6, folds=[0, 1], device="cuda"), work)  # more folds: fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(DemoStageError, match="not empty"):
        _check_config(DemoConfig(workdir=tmp_path / "other"), WorkFolder(tmp_path / "other"))

    env = subprocess_environment(work, "cpu")
    assert env["nnUNet_raw"] == str(work.raw) and env["nnUNet_results"] == str(work.results)
    ext = env["nnUNet_extTrainer"].split(os.pathsep)
    assert ext[0] == str(work.trainers) and ext[1].endswith("nnunet_trainers")
    assert 1 <= int(env["nnUNet_def_n_proc"]) <= 4
    # Training on a 2-core CPU augments in the training process (0); planning keeps >= 1 (nnU-Net's
    # planner hands the value to torch.set_num_threads); the user's setting wins.
    from nnunetv2_l1dfl.demo import training_environment

    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    env = subprocess_environment(work, "cpu")
    assert env["nnUNet_n_proc_DA"] == "1" and training_environment(env, "cpu")["nnUNet_n_proc_DA"] == "0"
    assert training_environment(env, "cuda")["nnUNet_n_proc_DA"] == "1"
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    env = subprocess_environment(work, "cpu")
    assert env["nnUNet_n_proc_DA"] == "4" and training_environment(env, "cpu")["nnUNet_n_proc_DA"] == "4"
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("nnUNet_n_proc_DA", "3")
    assert training_environment(subprocess_environment(work, "cpu"), "cpu")["nnUNet_n_proc_DA"] == "3"


def test_cap_plans_keeps_a_consistent_topology(tmp_path):
    plans = {
        "plans_name": "nnUNetPlans",
        "configurations": {"3d_fullres": {
            "patch_size": [80, 96, 96], "batch_size": 2, "spacing": [5.0, 4.0, 4.0],
            "architecture": {"arch_kwargs": {
                "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320],
                "kernel_sizes": [[3, 3, 3]] * 5, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4,
                "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4}}}},
    }
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(plans))
    change = cap_3d_fullres_plans(path, max_patch=48, base_features=16)
    capped = json.loads(path.read_text())
    config = capped["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    assert max(config["patch_size"]) <= 48 and change["after"]["patch_size"] == config["patch_size"]
    n = arch["n_stages"]
    assert len(arch["strides"]) == len(arch["kernel_sizes"]) == len(arch["features_per_stage"]) == n
    assert len(arch["n_conv_per_stage_decoder"]) == n - 1 and arch["features_per_stage"][0] == 16
    for axis, size in enumerate(config["patch_size"]):
        assert size % int(np.prod([s[axis] for s in arch["strides"]])) == 0, "patch divisible by the poolings"
    assert json.loads((tmp_path / "nnUNetPlans.json.orig").read_text()) == plans
    assert cap_3d_fullres_plans(path, max_patch=48, base_features=16) == change  # idempotent


def test_installed_package_is_not_put_on_pythonpath(tmp_path):
    # site-packages on PYTHONPATH would outrank the standard library (the argparse backport shadowed it)
    import site
    from pathlib import Path

    from nnunetv2_l1dfl.demo import checkout_root

    installed = Path(site.getsitepackages()[0]) / "nnunetv2_l1dfl" / "__init__.py"
    assert checkout_root(installed) is None
    checkout = tmp_path / "repo" / "nnunetv2_l1dfl" / "__init__.py"
    checkout.parent.mkdir(parents=True)
    checkout.touch()
    assert checkout_root(checkout) == os.path.realpath(tmp_path / "repo")


def test_cap_plans_caps_the_2d_batch_and_width_and_keeps_the_topology(tmp_path):
    arch = {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 512], "kernel_sizes": [[3, 3]] * 5,
            "strides": [[1, 1]] + [[2, 2]] * 4, "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4}
    plans = {"configurations": {"2d": {"patch_size": [64, 64], "batch_size": 90, "spacing": [5.5, 5.0],
                                       "architecture": {"arch_kwargs": arch}}}}
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(plans))
    change = cap_plans(path, "2d", max_patch=0, base_features=16, max_batch=16)
    config = json.loads(path.read_text())["configurations"]["2d"]
    capped = config["architecture"]["arch_kwargs"]
    assert config["batch_size"] == 16 and config["patch_size"] == [64, 64]
    assert capped["features_per_stage"] == [16, 32, 64, 128, 256]
    assert capped["strides"] == arch["strides"] and capped["kernel_sizes"] == arch["kernel_sizes"]
    assert change["before"]["batch_size"] == 90 and change["configuration"] == "2d"
    # nothing to cap: the plan is left alone
    path.write_text(json.dumps(plans))
    assert cap_plans(path, "2d", max_patch=0, base_features=0, max_batch=0) == {}
    assert json.loads(path.read_text()) == plans


def test_device_defaults_give_a_cpu_demo_that_can_learn_and_a_real_cuda_experiment():
    from nnunetv2_l1dfl.demo import DEVICE_DEFAULTS

    cpu, cuda = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]
    assert cpu["configuration"] == "2d" and cpu["heldout"] >= 1 and 0.33 <= cpu["oversample"] <= 1
    assert cpu["epochs"] * cpu["iterations"] >= 1000  # 500 steps of 16 slices barely started to learn
    assert cuda["configuration"] == "3d_fullres" and cuda["folds"] == [0, 1, 2, 3, 4]
    assert cuda["epochs"] * cuda["iterations"] >= 8 * cpu["epochs"] * cpu["iterations"]  # 10000 vs 1125


def test_progress_png_drawn_every_n_epochs_and_at_the_last(tmp_path):
    from nnunetv2_l1dfl.training.schedules import plot_progress_every, write_schedule_trainers

    drawn = []

    class Logger:
        def plot_progress_png(self, folder):
            drawn.append((trainer.current_epoch, folder))

    class Trainer:
        logger, num_epochs, current_epoch = Logger(), 12, 0

    trainer = Trainer()
    plot_progress_every(trainer, 5)
    for epoch in range(12):
        trainer.current_epoch = epoch
        trainer.logger.plot_progress_png("out")
    assert [e for e, _ in drawn] == [4, 9, 11] and {f for _, f in drawn} == {"out"}
    with pytest.raises(ValueError, match="every"):
        plot_progress_every(Trainer(), 0)

    module = tmp_path / "l1dfl_schedule_trainers_demo.py"
    write_schedule_trainers(tmp_path, num_epochs=3, iterations_per_epoch=2, val_iterations=1, plot_every=5)
    text = module.read_text()
    assert "plot_progress_every(self, 5)" in text and "import plot_progress_every" in text
    compile(text, str(module), "exec")
    write_schedule_trainers(tmp_path, num_epochs=3, iterations_per_epoch=2, val_iterations=1)
    assert "plot_progress_every" not in module.read_text()  # the default draws after every epoch, as nnU-Net
    with pytest.raises(ValueError, match="plot_every"):
        write_schedule_trainers(tmp_path, num_epochs=3, iterations_per_epoch=2, val_iterations=1, plot_every=0)
