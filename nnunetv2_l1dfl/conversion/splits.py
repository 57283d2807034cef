"""Patient-grouped cross-validation splits (nnU-Net's ``splits_final.json``) for converted datasets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from nnunetv2_l1dfl.conversion.case_ids import short_hash
from nnunetv2_l1dfl.conversion.dataset_folder import finished_case_ids, read_metadata_table, write_json_atomic
from nnunetv2_l1dfl.conversion.errors import ConversionError


def make_patient_splits(case_patients: Mapping[str, str], n_folds: int = 5) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content with all studies of a patient in one fold.

    case_patients: case ID -> patient key. Patients go, largest first (ties by a hash of the key,
    so the order does not follow the IDs' alphabet), to the fold with the fewest cases so far;
    the result depends only on the mapping. Raises when there are fewer patients than folds.
    """
    if n_folds < 2:
        raise ConversionError(f"--folds must be at least 2 (cross-validation), got {n_folds}")
    by_patient: dict[str, list[str]] = {}
    for case_id, patient in case_patients.items():
        by_patient.setdefault(patient, []).append(case_id)
    if len(by_patient) < n_folds:
        raise ConversionError(
            f"{len(by_patient)} patients cannot fill {n_folds} folds with one patient's studies in one fold"
        )
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    order = sorted(by_patient, key=lambda p: (-len(by_patient[p]), short_hash(p, 16), p))
    for patient in order:
        target = min(range(n_folds), key=lambda i: (len(folds[i]), i))
        folds[target].extend(by_patient[patient])
    all_cases = sorted(case_patients)
    return [{"train": [c for c in all_cases if c not in set(f)], "val": sorted(f)} for f in folds]


def write_splits(
    dataset_folder_name: str, splits: list[dict[str, list[str]]], preprocessed_dir: str | Path | None = None
) -> Path:
    """Write ``splits_final.json`` into ``<nnUNet_preprocessed>/<DatasetXXX_Name>/``."""
    root = preprocessed_dir or os.environ.get("nnUNet_preprocessed")
    if not root:
        raise ConversionError(
            "cannot write splits_final.json: set nnUNet_preprocessed (or pass --preprocessed-dir)"
        )
    folder = Path(root) / dataset_folder_name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "splits_final.json"
    write_json_atomic(splits, path)
    return path


def splits_for_dataset(dataset_dir: Path, n_folds: int = 5) -> list[dict[str, list[str]]]:
    """Patient-grouped splits of a converted dataset, from its metadata table."""
    rows = read_metadata_table(dataset_dir)
    finished = set(finished_case_ids(dataset_dir))
    case_patients = {r["case_id"]: r["patient"] or r["case_id"] for r in rows if r["case_id"] in finished}
    missing = finished - set(case_patients)
    for case_id in missing:  # cases not written by us: each its own patient
        case_patients[case_id] = case_id
    return make_patient_splits(case_patients, n_folds)

