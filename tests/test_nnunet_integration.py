"""nnU-Net finds and trains the L1DFL trainers through its own commands, as users meet them.

Every nnU-Net command runs in a subprocess whose environment holds only PATH/HOME, the three
nnU-Net folders and, where the test plays a user with trainers of their own, ``nnUNet_extTrainer``
pointing at them: discovery of this package's trainers must come from the installed ``.pth`` hook.
(``nnUNet_n_proc_DA=1`` and ``nnUNet_def_n_proc=1`` only keep nnU-Net from spawning a dozen
augmentation and export workers, each importing torch, on a 2-core CI machine.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _nnunetv2_l1dfl_hook import TRAINER_FOLDER, extend_ext_trainer_path


def clean_env(extra: dict | None = None) -> dict:
    env = {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "nnUNet_n_proc_DA": "1",
        "nnUNet_def_n_proc": "1",
    }
    env.update(extra or {})
    return env


def run(cmd: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_hook_appends_our_folder_once_and_keeps_user_entries():
    env = {"nnUNet_extTrainer": os.pathsep.join(["/user/trainers", "/more"])}
    extended = extend_ext_trainer_path(env)
    assert extended.split(os.pathsep) == ["/user/trainers", "/more", TRAINER_FOLDER]
    assert extend_ext_trainer_path({"nnUNet_extTrainer": extended}) == extended
    assert extend_ext_trainer_path({}) == TRAINER_FOLDER


LOOKUP = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
          "import sys, contextlib, io\n"
          "for name in sys.argv[1:]:\n"
          "    with contextlib.redirect_stdout(io.StringIO()):\n"
          "        cls = f(name)\n"
          "    print(name, cls.__module__)\n")


def test_nnunet_resolves_trainers_in_a_clean_environment(tmp_path):
    names = ["nnUNetTrainerL1DFL", "nnUNetTrainerDiceFocal", "nnUNetTrainerSquaredDice",
             "nnUNetTrainerL1DFL_gamma5_bw0p05", "nnUNetTrainerDiceFocal_250epochs", "nnUNetTrainerSquaredDice_5epochs"]
    out = run([sys.executable, "-c", LOOKUP, *names], clean_env(), cwd=tmp_path).stdout
    assert out.split("\n")[:6] == [f"{n} nnunetv2_l1dfl.training.trainers" for n in names]


def test_user_ext_trainer_entries_still_work(tmp_path):
    user_dir = tmp_path / "my_trainers"
    user_dir.mkdir()
    (user_dir / "my_trainer.py").write_text(
        "from nnunetv2_l1dfl.training.trainers import nnUNetTrainerL1DFL\n"
        "class MyL1DFLTrainer(nnUNetTrainerL1DFL):\n    l1dfl_gamma = 3.0\n")
    out = run([sys.executable, "-c", LOOKUP, "MyL1DFLTrainer", "nnUNetTrainerL1DFL"],
              clean_env({"nnUNet_extTrainer": str(user_dir)}), cwd=tmp_path).stdout
    assert "MyL1DFLTrainer my_trainer" in out and "nnUNetTrainerL1DFL nnunetv2_l1dfl.training.trainers" in out


def test_trainers_build_their_losses(tmp_path):
    """Each trainer's loss carries its class attributes; deep supervision weights as stock."""
    import torch

    from nnunetv2_l1dfl.training import trainers as t

    assert len(t.TRAINER_NAMES) == len(set(t.TRAINER_NAMES)) == 3 + 9 + 3 * len(t.EPOCH_VARIANTS)
    grid = t.nnUNetTrainerL1DFL_gamma5_bw0p05
    assert (grid.l1dfl_gamma, grid.l1dfl_bin_width, grid.l1dfl_weighted) == (5.0, 0.05, True)
    assert t.nnUNetTrainerDiceFocal.l1dfl_weighted is False
    assert t.nnUNetTrainerDiceFocal_5epochs.fixed_num_epochs == 5
    dl = t.nnUNetTrainerSquaredDice_5epochs
    assert (dl.l1dfl_weighted, dl.l1dfl_focal, dl.fixed_num_epochs) == (False, False, 5)

    class FakeTrainer:  # what deep_supervision_weights reads from a trainer
        is_ddp = False
        enable_deep_supervision = True

        def _get_deep_supervision_scales(self):
            return [[1, 1, 1], [0.5] * 3, [0.25] * 3, [0.125] * 3]

        def _do_i_compile(self):
            return False

    w = t.deep_supervision_weights(FakeTrainer())
    np.testing.assert_allclose(w, np.array([1, 0.5, 0.25, 0]) / 1.75)
    ddp = FakeTrainer()
    ddp.is_ddp = True
    assert t.deep_supervision_weights(ddp)[-1] == pytest.approx(1e-6 / 1.750001)
    wrapped = t.wrap_deep_supervision(FakeTrainer(), torch.nn.Identity())
    assert wrapped.weight_factors == tuple(w)

    class FakeManager:
        ignore_label, has_regions, batch_dice = None, False, True

    expected = {  # trainer: (weighted, focal, gamma, bin width, name in the training log)
        t.nnUNetTrainerL1DFL: (True, True, 2.0, 0.1, "L1DFL"),
        t.nnUNetTrainerL1DFL_gamma1_bw0p2: (True, True, 1.0, 0.2, "L1DFL"),
        t.nnUNetTrainerDiceFocal: (False, True, 2.0, 0.1, "DFL baseline"),
        t.nnUNetTrainerSquaredDice: (False, False, 2.0, 0.1, "DL baseline"),
    }
    for cls, (weighted, focal, gamma, width, logged) in expected.items():
        trainer = cls.__new__(cls)  # the attributes _build_loss reads, without plans or a dataset
        fake = FakeTrainer()
        trainer.is_ddp, trainer.enable_deep_supervision = False, True
        trainer._get_deep_supervision_scales = fake._get_deep_supervision_scales
        trainer._do_i_compile = fake._do_i_compile
        trainer.label_manager = trainer.configuration_manager = FakeManager()
        trainer.log = []
        trainer.print_to_log_file = trainer.log.append
        loss = trainer._build_loss().loss
        assert (loss.weighted, loss.focal, loss.gamma, loss.bin_width) == (weighted, focal, gamma, width), cls
        assert loss.batch_dice is False, "Dice per sample and class unless a trainer asks for batch Dice"
        assert logged in trainer.log[-1], trainer.log


def _write_toy_dataset(raw: Path, dataset_id: int, n_cases: int = 8, size: int = 32) -> str:
    import SimpleITK as sitk

    name = f"Dataset{dataset_id:03d}_L1DFLToy"
    folder = raw / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "imagesTs").mkdir()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:size, :size, :size]

    def write(array, path):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 3.0))
        image.SetOrigin((-30.0, 12.5, 100.0))
        sitk.WriteImage(image, str(path))

    for i in range(n_cases + 1):
        centre = rng.uniform(10, size - 10, 3)
        radius = rng.uniform(3, 6)
        lesion = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius**2
        ct = (rng.normal(40, 20, lesion.shape) - 900 * (xx < 3)).astype(np.float32)
        pet = (rng.gamma(2.0, 0.5, lesion.shape) + 8.0 * lesion).astype(np.float32)
        case = f"toy_{i:03d}"
        target = folder / ("imagesTs" if i == n_cases else "imagesTr")
        write(ct, target / f"{case}_0000.nii.gz")
        write(pet, target / f"{case}_0001.nii.gz")
        if i < n_cases:
            write(lesion.astype(np.uint8), folder / "labelsTr" / f"{case}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "noNorm"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }))
    return name


@pytest.mark.slow
def test_plan_train_continue_predict_find_best(tmp_path):
    from nnunetv2_l1dfl.training.schedules import write_schedule_trainers

    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        paths[name] = str(tmp_path / name)
        os.makedirs(paths[name])
    dataset = _write_toy_dataset(Path(paths["nnUNet_raw"]), 901)
    trainer_dir = tmp_path / "user_trainers"
    names = write_schedule_trainers(trainer_dir, num_epochs=1, iterations_per_epoch=3, val_iterations=1,
                                    suffix="e2e", bases=("nnUNetTrainerL1DFL",))
    trainer = names["nnUNetTrainerL1DFL"]
    env = clean_env({**paths, "nnUNet_extTrainer": str(trainer_dir)})

    run(["nnUNetv2_plan_and_preprocess", "-d", "901", "-c", "2d", "3d_fullres", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], env, tmp_path)
    for config in ("3d_fullres", "2d"):
        run(["nnUNetv2_train", "901", config, "0", "-tr", trainer, "-device", "cpu"], env, tmp_path)
        out = Path(paths["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{config}" / "fold_0"
        assert (out / "checkpoint_final.pth").is_file()
        assert sorted(p.name for p in (out / "validation").glob("*.nii.gz")), "no validation predictions"
        log = "\n".join(p.read_text() for p in out.glob("training_log_*.txt"))
        assert "Loss: L1DFL: bin_width=0.1, gamma=2" in log, log[-2000:]
        assert "train_loss" in log and "nan" not in log.split("train_loss", 1)[1].split("\n", 1)[0]

    # --c continues from the final checkpoint (nothing left to train: validation runs again)
    run(["nnUNetv2_train", "901", "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "--c"], env, tmp_path)

    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(Path(paths["nnUNet_raw"]) / dataset / "imagesTs"), "-o", str(pred),
         "-d", "901", "-c", "3d_fullres", "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1"], env, tmp_path)
    import SimpleITK as sitk

    prediction = sitk.ReadImage(str(pred / "toy_008.nii.gz"))
    reference = sitk.ReadImage(str(Path(paths["nnUNet_raw"]) / dataset / "imagesTs" / "toy_008_0001.nii.gz"))
    assert prediction.GetSize() == reference.GetSize() and prediction.GetSpacing() == reference.GetSpacing()
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1}

    run(["nnUNetv2_find_best_configuration", "901", "-c", "3d_fullres", "-tr", trainer, "-f", "0", "-np", "1"],
        env, tmp_path)
    assert (Path(paths["nnUNet_results"]) / dataset / "inference_instructions.txt").is_file()
