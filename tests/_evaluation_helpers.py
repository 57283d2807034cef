"""Builders of tiny cases and of a miniature nnU-Net results tree for the evaluation tests.

Every number the tests check follows from the construction here; the docstrings say how.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPE = (8, 16, 16)  # (z, y, x)
SPACING = (2.0, 1.0, 1.0)  # mm, (z, y, x): one voxel = 2 mm^3 = 0.002 ml
VOXEL_ML = 0.002
BACKGROUND_SUV = 1.0
LESION_SUV = 3.0
HOT_SUV = 5.0


def write_image(path: Path, array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    """Write a (z, y, x) array with spacing given in (z, y, x) mm."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def box(mask: np.ndarray, z: tuple[int, int], y: tuple[int, int], x: tuple[int, int], value=1) -> np.ndarray:
    mask[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = value
    return mask


# Lesions as (z, y, x) half-open ranges; each is 2 x 3 x 3 = 18 voxels = 0.036 ml, its hottest voxel
# (SUV 5, the rest SUV 3) at its first (z, y, x) corner.
LESION_A = ((1, 3), (1, 4), (1, 4))
LESION_B = ((5, 7), (10, 13), (10, 13))
LESION_C = ((1, 3), (10, 13), (1, 4))
FP_VOXEL = ((7, 8), (15, 16), (0, 1))  # one voxel far from every lesion

#: GT lesions per case; case_03 has none. Folds hold cases (2k, 2k + 1).
CASE_LESIONS = {
    "case_00": [LESION_A],
    "case_01": [LESION_A, LESION_B],
    "case_02": [LESION_A],
    "case_03": [],
    "case_04": [LESION_B],
    "case_05": [LESION_A, LESION_B, LESION_C],
    "case_06": [LESION_C],
    "case_07": [LESION_A, LESION_C],
    "case_08": [LESION_B],
    "case_09": [LESION_A, LESION_B],
}
REFERENCE = "nnUNetTrainer"
CANDIDATE = "nnUNetTrainerL1DFL"


def gt_and_pet(lesions: list) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros(SHAPE, dtype=np.uint8)
    pet = np.full(SHAPE, BACKGROUND_SUV, dtype=np.float32)
    for z, y, x in lesions:
        box(gt, z, y, x)
        box(pet, z, y, x, LESION_SUV)
        pet[z[0], y[0], x[0]] = HOT_SUV
    return gt, pet


def reference_prediction(case_id: str, gt: np.ndarray) -> np.ndarray:
    """The reference trainer equals the GT except: case_01 misses LESION_B (DSC 2*18/54 = 2/3,
    TP 1, FN 1); case_02 adds FP_VOXEL (DSC 36/37, FP 1, F1 2/3); case_03 (no GT) predicts FP_VOXEL
    (DSC 0, F1 0, FP 1)."""
    pred = gt.copy()
    if case_id == "case_01":
        box(pred, *LESION_B, value=0)
    if case_id in ("case_02", "case_03"):
        box(pred, *FP_VOXEL)
    return pred


#: the reference trainer's DSC per case (NaN nowhere: case_03 has a prediction)
REFERENCE_DICE = {c: 1.0 for c in CASE_LESIONS} | {"case_01": 2 / 3, "case_02": 36 / 37, "case_03": 0.0}
#: the candidate equals the GT: DSC 1, and NaN on case_03 (empty GT and prediction)
CANDIDATE_DICE = {c: (float("nan") if c == "case_03" else 1.0) for c in CASE_LESIONS}
#: probability the candidate gives its predicted class at every voxel (its .npz files)
CANDIDATE_CONFIDENCE = 0.8


def build_nnunet_tree(env: dict, dataset: str = "Dataset987_MiniPET", with_npz: bool = True) -> dict:
    """Raw data, splits and 5-fold results of two trainers for the cases in ``CASE_LESIONS``."""
    raw = Path(env["nnUNet_raw"]) / dataset
    results = Path(env["nnUNet_results"])
    preprocessed = Path(env["nnUNet_preprocessed"]) / dataset
    cases = sorted(CASE_LESIONS)
    (raw).mkdir(parents=True)
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT", "1": "CT"},  # PET named CT on purpose: names are not trusted
                "labels": {"background": 0, "lesion": 1},
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
            }
        )
    )
    preprocessed.mkdir(parents=True)
    splits = [
        {"train": [c for c in cases if c not in cases[2 * k : 2 * k + 2]], "val": cases[2 * k : 2 * k + 2]}
        for k in range(5)
    ]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits))
    trainer_folders = {
        t: results / dataset / f"{t}__nnUNetPlans__3d_fullres" for t in (REFERENCE, CANDIDATE)
    }
    for index, case_id in enumerate(cases):
        gt, pet = gt_and_pet(CASE_LESIONS[case_id])
        write_image(raw / "labelsTr" / f"{case_id}.nii.gz", gt)
        write_image(raw / "imagesTr" / f"{case_id}_0000.nii.gz", np.zeros(SHAPE, dtype=np.int16))
        write_image(raw / "imagesTr" / f"{case_id}_0001.nii.gz", pet)
        fold = index // 2
        for trainer, folder in trainer_folders.items():
            validation = folder / f"fold_{fold}" / "validation"
            pred = reference_prediction(case_id, gt) if trainer == REFERENCE else gt
            write_image(validation / f"{case_id}.nii.gz", pred)
            if trainer == CANDIDATE and with_npz:
                foreground = np.where(pred > 0, CANDIDATE_CONFIDENCE, 1 - CANDIDATE_CONFIDENCE).astype(np.float32)
                np.savez_compressed(validation / f"{case_id}.npz", probabilities=np.stack([1 - foreground, foreground]))
    return {"raw": raw, "results": results / dataset, "trainer_folders": trainer_folders, "dataset": dataset}
