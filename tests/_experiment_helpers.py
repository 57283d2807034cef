"""Toy data and very short trainers for the ``l1dfl experiment`` tests.

The toy dataset is the smallest nnU-Net accepts for a 5-fold split (6 cases of 20^3 voxels, CT +
PET channels, one spherical lesion each). The trainers live in a folder the test hands to the
experiment as its own ``trainer_folders`` entry, the way users add theirs: ``nnUNetTrainer_xp`` and
``nnUNetTrainerL1DFL_xp`` run ``epochs`` epochs of 2 iterations with 1 validation iteration and
save ``checkpoint_latest.pth`` after every epoch, so a cancelled training has a checkpoint to
continue from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATASET_ID = 917
TRAINERS = ("nnUNetTrainer_xp", "nnUNetTrainerL1DFL_xp")

_TRAINERS_MODULE = '''"""Very short trainers for the l1dfl experiment tests.

Validation is nnU-Net's own, with two test-speed changes: no mirroring at inference, and its export
and evaluation pools forked instead of spawned (a spawned worker imports torch again: a minute on a
loaded 2-core machine).
"""
import multiprocessing

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_l1dfl.training.trainers import nnUNetTrainerL1DFL


class _Short:
    def _shorten(self):
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, patch, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, patch, None

    def perform_actual_validation(self, save_probabilities: bool = False):
        get_context = multiprocessing.get_context
        multiprocessing.get_context = lambda method=None: get_context("fork")
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            multiprocessing.get_context = get_context


class nnUNetTrainer_xp(_Short, nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._shorten()


class nnUNetTrainerL1DFL_xp(_Short, nnUNetTrainerL1DFL):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._shorten()
'''


def write_trainers(folder: Path, epochs: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "l1dfl_xp_trainers.py").write_text(_TRAINERS_MODULE.format(epochs=int(epochs)))
    return folder


def write_toy_dataset(raw: Path, dataset_id: int = DATASET_ID, n_cases: int = 6, size: int = 20) -> str:
    import SimpleITK as sitk

    name = f"Dataset{dataset_id:03d}_XpToy"
    folder = raw / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    for i in range(n_cases):
        centre = rng.uniform(6, size - 6, 3)
        lesion = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= rng.uniform(2.5, 4) ** 2
        ct = rng.normal(40, 20, lesion.shape).astype(np.float32)
        pet = (rng.gamma(2.0, 0.5, lesion.shape) + 8.0 * lesion).astype(np.float32)
        for array, path in ((ct, folder / "imagesTr" / f"xp_{i:03d}_0000.nii.gz"),
                            (pet, folder / "imagesTr" / f"xp_{i:03d}_0001.nii.gz"),
                            (lesion.astype(np.uint8), folder / "labelsTr" / f"xp_{i:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.0))
            sitk.WriteImage(image, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "noNorm"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return name


def nnunet_folders(root: Path) -> dict[str, Path]:
    folders = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def quiet_nnunet_env() -> dict[str, str]:
    """Few processes for a 2-core machine: one data-augmentation worker, one export worker."""
    return {"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def l1dfl(*args: str, env: dict | None = None, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m nnunetv2_l1dfl.cli ARGS`` in a subprocess (the checkout first on PYTHONPATH)."""
    repo = str(Path(__file__).resolve().parents[1])
    full = dict(os.environ, **(env or {}))
    full["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in full.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, "-m", "nnunetv2_l1dfl.cli", *args], env=full, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"l1dfl {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
