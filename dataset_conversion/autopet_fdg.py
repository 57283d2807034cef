"""autoPET I/II (FDG-PET-CT-Lesions, TCIA NIfTI release) into a two-channel nnU-Net dataset.

Layout: ``PETCT_<id>/<study folder>/{CT,CTres,PET,SUV,SEG}.nii.gz``, study folders named by TCIA
as ``MM-DD-YYYY-NA-<description>-<number>`` (with spaces). ``CTres`` (CT already on the PET grid,
HU) becomes channel 0000, ``SUV`` channel 0001, ``SEG`` the label. Case IDs are
``fdg_<id>_<YYYYMMDD>``, the same as :mod:`dataset_conversion.autopet_iii` gives the same study.
A ``*metadata*.csv`` at the top (TCIA's ``fdg_metadata.csv``) is copied into the dataset folder
(``source_metadata/``) and its scanner column fills the metadata table.

    python -m dataset_conversion.autopet_fdg /data/FDG-PET-CT-Lesions -d 221 -n AutoPETII
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from nnunetv2_l1dfl.conversion.case_ids import CaseKey, assign_case_ids, normalize_study_date
from nnunetv2_l1dfl.conversion.dataset_folder import DatasetSpec, LoadedCase, resolve_raw_dir
from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.geometry import snap_to_grid
from nnunetv2_l1dfl.conversion.image_io import read_image
from nnunetv2_l1dfl.conversion.masks import MaskOptions, labels_from_image
from nnunetv2_l1dfl.conversion.runner import CaseJob, ConversionSummary, convert_cases

logger = logging.getLogger(__name__)

REFERENCE = "Gatidis & Kuestner, FDG-PET-CT-Lesions, The Cancer Imaging Archive 2022, doi:10.7937/gkr0-xv29"


# ---- helpers shared with autopet_iii ------------------------------------------------------------


def _column_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def subject_hex(subject_id: str) -> str:
    """``PETCT_0117d7f11f`` / ``PSMA_95b833d4`` / ``0117d7f11f`` -> the lower-case hex part."""
    return subject_id.strip().split("_")[-1].lower()


def read_source_metadata(csv_paths: Iterable[Path]) -> dict[tuple[str, str], dict[str, str]]:
    """autoPET metadata rows keyed by (subject hex, YYYYMMDD) with ``scanner`` and ``radionuclide``.

    Column names differ between releases (``Manufacturer Model Name`` vs ``manufacturer_model_name``),
    so they are matched without case and punctuation. Rows without subject or date are ignored; the
    first row with a value wins (TCIA lists one row per series).
    """
    index: dict[tuple[str, str], dict[str, str]] = {}
    for path in csv_paths:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = {_column_key(c): c for c in reader.fieldnames or ()}
            subject_col, date_col = columns.get("subjectid"), columns.get("studydate")
            if not subject_col or not date_col:
                logger.warning("%s: no 'Subject ID' / 'Study Date' columns; not used for metadata", path)
                continue
            scanner_col = columns.get("manufacturermodelname") or columns.get("manufacturer")
            nuclide_col = columns.get("petradionuclide") or columns.get("radionuclide")
            for row in reader:
                key = (subject_hex(row.get(subject_col) or ""), normalize_study_date(row.get(date_col)))
                if not key[0] or not key[1]:
                    continue
                entry = index.setdefault(key, {"scanner": "", "radionuclide": ""})
                for out, col in (("scanner", scanner_col), ("radionuclide", nuclide_col)):
                    if col and not entry[out] and (row.get(col) or "").strip():
                        entry[out] = row[col].strip()
    return index


def copy_source_metadata(csv_paths: Iterable[Path], dataset_dir: Path) -> None:
    """Keep the release's metadata CSVs in ``<dataset>/source_metadata/`` (ignored by nnU-Net)."""
    for path in csv_paths:
        target = dataset_dir / "source_metadata" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def load_on_pet_grid(job: CaseJob) -> LoadedCase:
    """Worker for both autoPET releases: payload holds the ``ct``, ``pet``, ``label`` paths (CT
    already on the PET grid), ``mask_options`` and the ``metadata`` dict. The label must be 0/1
    (integers; ``--mask-threshold`` binarizes a non-integer one)."""
    paths = job.payload
    options = paths.get("mask_options") or MaskOptions()
    pet = read_image(paths["pet"], "PET (SUV)", job.case_id)
    ct = snap_to_grid(read_image(paths["ct"], "CT", job.case_id), pet, "CT", job.case_id)
    label = labels_from_image(read_image(paths["label"], "label", job.case_id), paths["label"], options, allowed=[1])
    label = snap_to_grid(label.label, pet, "label", job.case_id)
    return LoadedCase(ct=ct, pet=pet, label=label, metadata=dict(paths["metadata"]))


# ---- autoPET I/II ------------------------------------------------------------------------------


def find_autopet_fdg_studies(input_dir: Path) -> list[Path]:
    """Study folders (those holding SUV.nii.gz) under ``input_dir``, sorted."""
    return sorted({p.parent for p in Path(input_dir).rglob("SUV.nii.gz")})


def convert_autopet_fdg(
    input_dir: Path | str,
    dataset_id: int = 221,
    name: str = "AutoPETII",
    raw_dir: Path | str | None = None,
    *,
    pet_norm: str = "CT",
    num_processes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    mask_options: MaskOptions | None = None,
    allow_implausible_suv: bool = False,
) -> tuple[ConversionSummary, DatasetSpec]:
    """Convert the autoPET I/II FDG release; returns the summary and the dataset's spec.

    ``mask_options``: ``--mask-threshold`` for the labels (:class:`MaskOptions`).

    A study folder without ``CTres.nii.gz`` or ``SEG.nii.gz`` fails with that reason; the others
    go on.
    """
    input_dir = Path(input_dir)
    studies = find_autopet_fdg_studies(input_dir)
    if not studies:
        raise ConversionError(
            f"no PETCT_*/<study>/SUV.nii.gz under {input_dir}: is this the autoPET I/II release?"
        )
    spec = DatasetSpec(
        raw_dir=resolve_raw_dir(raw_dir), dataset_id=dataset_id, name=name, pet_norm=pet_norm,
        description="autoPET I/II FDG PET/CT whole-body lesions (CT on the PET grid, PET in SUVbw)",
        extra_json={"reference": REFERENCE, "licence": "TCIA Restricted / see the source", "tracer": "FDG"},
    )  # fmt: skip
    csv_paths = sorted(p for p in input_dir.glob("*.csv") if "metadata" in p.name.lower())
    metadata = read_source_metadata(csv_paths)

    keys = {}
    for study in studies:
        patient = study.parent.name
        keys[study] = CaseKey(
            patient_id=subject_hex(patient), study_date=study.name, discriminator=study.name, prefix="fdg"
        )
    case_ids = assign_case_ids(keys.values())
    jobs = []
    for study, key in keys.items():
        date = normalize_study_date(study.name)
        entry = metadata.get((key.patient_id, date), {})
        jobs.append(
            CaseJob(
                case_id=case_ids[key],
                patient=study.parent.name,
                source=str(study),
                payload={
                    "ct": study / "CTres.nii.gz",
                    "pet": study / "SUV.nii.gz",
                    "label": study / "SEG.nii.gz",
                    "mask_options": mask_options,
                    "metadata": {
                        "allow_implausible_suv": allow_implausible_suv,
                        "patient": study.parent.name,
                        "study_date": date,
                        "tracer": "FDG",
                        "scanner": entry.get("scanner", ""),
                        "suv_branch": "precomputed: autoPET SUV.nii.gz",
                        "source": f"{study.parent.name}/{study.name}",
                    },
                },
            )
        )
    summary = convert_cases(
        jobs, load_on_pet_grid, spec, num_processes=num_processes, overwrite=overwrite, progress=progress
    )
    copy_source_metadata(csv_paths, spec.dataset_dir)
    return summary, spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """autoPET I/II has no options beyond the common ones."""


def run(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.conversion.cli import report

    summary, spec = convert_autopet_fdg(
        args.input_dir, args.dataset_id, args.name, args.raw_dir, pet_norm=args.pet_norm,
        num_processes=args.num_processes, overwrite=args.overwrite, progress=not args.no_progress,
        mask_options=MaskOptions.from_args(args),
        allow_implausible_suv=args.allow_implausible_suv,
    )  # fmt: skip
    return report(summary, spec, args)


if __name__ == "__main__":
    from nnunetv2_l1dfl.conversion.cli import converter_main

    sys.exit(converter_main("dataset_conversion.autopet_fdg"))
