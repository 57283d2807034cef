"""NIfTI folders (one folder per case with CT, PET and lesion mask) into a two-channel nnU-Net dataset.

Without a manifest every sub-folder of INPUT_DIR holding images is a case; its files are found by
name (case-insensitive, any of ``.nii.gz .nii .mha .nrrd``): CT ``ctres`` > ``ct*``; PET ``suv`` >
``pet*`` / ``pt*``; mask ``seg*`` / ``mask*`` / ``label*`` / ``gt*`` / ``lesion*``. A folder where
a role is missing or ambiguous fails with the file names. CT and mask may be on any grid: both are
resampled onto the PET grid.

PET is taken as SUVbw unless ``--pet-units BQML``; then each case needs, in the manifest,
``weight_kg``, ``injected_dose_bq`` (or ``injected_dose_mbq``), ``half_life_s`` and
``injection_to_reference_s`` (seconds from injection to the time the PET is decay-corrected to:
the scan start for DICOM DecayCorrection START, 0 for ADMIN).

``--manifest CSV`` gives explicit control: columns ``case, patient, ct, pet, mask`` (paths relative
to the CSV's folder or absolute) and optionally ``study_date, tracer, scanner, pet_units`` and the
SUV columns above.

    python -m dataset_conversion.nifti_folders /data/cases -d 501 -n MyPETCT --manifest cases.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import sys
from pathlib import Path

from nnunetv2_l1dfl.conversion.case_ids import CaseKey, PseudonymKey, assign_case_ids, normalize_study_date
from nnunetv2_l1dfl.conversion.dataset_folder import DatasetSpec, LoadedCase, resolve_raw_dir
from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.image_io import read_image
from nnunetv2_l1dfl.conversion.masks import MaskOptions, labels_from_image
from nnunetv2_l1dfl.conversion.resample import place_on_pet_grid
from nnunetv2_l1dfl.conversion.runner import CaseJob, ConversionSummary, convert_cases

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
# Per role: patterns on the lower-case file stem, best first.
ROLE_PATTERNS = {
    "ct": (r"ctres", r"ct.*"),
    "pet": (r"suv.*", r"pet.*|pt.*"),
    "mask": (r"seg.*|mask.*|labels?.*|gt.*|lesions?.*",),
}
SUV_COLUMNS = ("weight_kg", "half_life_s", "injection_to_reference_s")
PET_UNITS = ("SUV", "BQML")


def _stem(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_case_files(folder: Path) -> dict[str, Path]:
    """CT, PET and mask of one case folder, by file name; a ConversionError when one is missing or ambiguous."""
    images = {p: _stem(p) for p in sorted(folder.iterdir()) if p.is_file() and _stem(p) is not None}
    found = {}
    for role, patterns in ROLE_PATTERNS.items():
        for pattern in patterns:
            matches = [
                p for p, stem in images.items() if re.fullmatch(pattern, stem) and p not in found.values()
            ]
            if len(matches) == 1:
                found[role] = matches[0]
                break
            if len(matches) > 1:
                raise ConversionError(
                    f"{folder}: more than one {role} file: {', '.join(p.name for p in matches)}"
                )
        else:
            names = ", ".join(p.name for p in images) or "no image files"
            raise ConversionError(f"{folder}: no {role} file found among {names} (or use --manifest)")
    return found


def _float(row: dict[str, str], column: str, case: str) -> float:
    value = (row.get(column) or "").strip()
    try:
        return float(value)
    except ValueError:
        raise ConversionError(
            f"case {case}: manifest column {column!r} must be a number, got {value!r}"
        ) from None


def suv_factor_from_row(row: dict[str, str], case: str) -> float:
    """SUVbw per Bq/ml from the manifest's weight, dose, half-life and injection-to-reference time."""
    from nnunetv2_l1dfl.conversion.suv import suv_bw_scale

    missing = [c for c in SUV_COLUMNS if not (row.get(c) or "").strip()]
    if not (row.get("injected_dose_bq") or "").strip() and not (row.get("injected_dose_mbq") or "").strip():
        missing.append("injected_dose_bq")
    if missing:
        raise ConversionError(
            f"case {case}: PET in BQML needs manifest column(s) {', '.join(missing)} for SUV"
        )
    if (row.get("injected_dose_bq") or "").strip():
        dose_bq = _float(row, "injected_dose_bq", case)
    else:
        dose_bq = _float(row, "injected_dose_mbq", case) * 1e6
    return suv_bw_scale(
        _float(row, "weight_kg", case),
        dose_bq,
        _float(row, "half_life_s", case),
        _float(row, "injection_to_reference_s", case),
    )


def load_nifti_case(job: CaseJob) -> LoadedCase:
    """Worker: payload has ``ct``, ``pet``, ``mask`` paths, ``pet_units``, the manifest ``row``, ``metadata``."""
    import SimpleITK as sitk

    p = job.payload
    pet = sitk.Cast(read_image(p["pet"], "PET", job.case_id), sitk.sitkFloat32)
    metadata = dict(p["metadata"])
    if p["pet_units"] == "BQML":
        factor = suv_factor_from_row(p["row"], job.case_id)
        pet = pet * factor
        metadata["suv_branch"] = f"BQML x {factor:.6g} (g/ml per Bq/ml) from the manifest"
    else:
        metadata["suv_branch"] = "precomputed: PET given in SUV"
    ct = read_image(p["ct"], "CT", job.case_id)
    options = p.get("mask_options") or MaskOptions()
    # Several lesion values are merged into one class; each value keeps its own lesion accounting.
    mask = labels_from_image(read_image(p["mask"], "mask", job.case_id), p["mask"], options, merge=True)
    ct, label, warnings = place_on_pet_grid(
        ct, mask.label, pet, job.case_id, options, structures=mask.structures, ct_name=f"CT {p['ct']}"
    )
    return LoadedCase(ct=ct, pet=pet, label=label, metadata=metadata, warnings=warnings)


def read_manifest(path: Path) -> list[dict[str, str]]:
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or ()]
        missing = {"case", "ct", "pet", "mask"} - set(columns)
        if missing:
            raise ConversionError(
                f"manifest {path}: missing column(s) {sorted(missing)} (need case, ct, pet, mask)"
            )
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    base = path.parent
    for row in rows:
        for role in ("ct", "pet", "mask"):
            row[role] = (
                str((base / row[role]).resolve())
                if row[role] and not Path(row[role]).is_absolute()
                else row[role]
            )
    return rows


def convert_nifti_folders(
    input_dir: Path | str,
    dataset_id: int,
    name: str,
    raw_dir: Path | str | None = None,
    *,
    manifest: Path | str | None = None,
    pet_units: str = "SUV",
    tracer: str = "",
    pseudonym_key: Path | str | None = None,
    pet_norm: str = "CT",
    num_processes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    mask_options: MaskOptions | None = None,
    allow_implausible_suv: bool = False,
) -> tuple[ConversionSummary, DatasetSpec]:
    """Convert NIfTI case folders (or a manifest's rows); ``pseudonym_key`` set = pseudonymize.

    ``mask_options``: lesion accounting, ``--mask-threshold`` and CT coverage (:class:`MaskOptions`).
    """
    if pet_units not in PET_UNITS:
        raise ConversionError(f"--pet-units must be one of {PET_UNITS}, got {pet_units!r}")
    input_dir = Path(input_dir)
    spec = DatasetSpec(
        raw_dir=resolve_raw_dir(raw_dir), dataset_id=dataset_id, name=name, pet_norm=pet_norm,
        description=f"PET/CT lesions converted from NIfTI folders ({input_dir.name})",
        extra_json={"tracer": tracer} if tracer else {},
    )  # fmt: skip
    failed: dict[str, str] = {}
    entries: list[tuple[CaseKey, dict[str, str]]] = []
    if manifest:
        for row in read_manifest(Path(manifest)):
            key = CaseKey(patient_id=row["case"], study_date=None, discriminator=row["case"])
            entries.append((key, row))
    else:
        if not input_dir.is_dir():
            raise ConversionError(f"input folder not found: {input_dir}")
        for folder in sorted(p for p in input_dir.iterdir() if p.is_dir()):
            if not any(_stem(p) for p in folder.iterdir() if p.is_file()):
                continue
            key = CaseKey(patient_id=folder.name, study_date=None, discriminator=folder.name)
            try:
                files = find_case_files(folder)
            except ConversionError as e:
                failed[assign_case_ids([key])[key]] = str(e)
                continue
            row = {"case": folder.name, "patient": folder.name, **{k: str(v) for k, v in files.items()}}
            entries.append((key, row))
        if not entries and not failed:
            raise ConversionError(f"no case folders with image files under {input_dir}")

    if pseudonym_key:
        key_file = PseudonymKey(pseudonym_key)
        patient_keys = [
            CaseKey(r.get("patient") or r["case"], r.get("study_date") or None, r["case"]) for _, r in entries
        ]
        pseudo_ids = key_file.assign(patient_keys, {k: r["case"] for k, (_, r) in zip(patient_keys, entries)})
        key_file.save()
        case_ids = {key: pseudo_ids[pk] for (key, _), pk in zip(entries, patient_keys)}
        patients = {key: key_file.pseudonym_of_case(case_ids[key]) for key, _ in entries}
    else:
        case_ids = assign_case_ids(key for key, _ in entries)
        patients = {key: row.get("patient") or row["case"] for key, row in entries}

    jobs = []
    for key, row in entries:
        units = (row.get("pet_units") or pet_units).upper()
        if units not in PET_UNITS:
            failed[case_ids[key]] = f"manifest pet_units {units!r} is not one of {PET_UNITS}"
            continue
        jobs.append(
            CaseJob(
                case_id=case_ids[key],
                patient=patients[key],
                source=row["case"] if pseudonym_key else row.get("pet", row["case"]),
                payload={
                    "ct": row["ct"],
                    "pet": row["pet"],
                    "mask": row["mask"],
                    "pet_units": units,
                    "row": row,
                    "mask_options": mask_options,
                    "metadata": {
                        "patient": patients[key],
                        "study_date": "" if pseudonym_key else normalize_study_date(row.get("study_date")),
                        "tracer": row.get("tracer") or tracer,
                        "scanner": row.get("scanner", ""),
                        "source": "" if pseudonym_key else row["case"],
                        "allow_implausible_suv": allow_implausible_suv,
                    },
                },
            )  # fmt: skip
        )
    summary = convert_cases(
        jobs, load_nifti_case, spec, num_processes=num_processes, overwrite=overwrite, failed_before=failed,
        progress=progress,
    )  # fmt: skip
    return summary, spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nnunetv2_l1dfl.conversion.cli import add_pseudonymize_arguments

    parser.add_argument(
        "--manifest", type=Path, default=None,
        help="CSV with columns case, patient, ct, pet, mask (+ optional study_date, tracer, scanner, pet_units, "
        "weight_kg, injected_dose_bq, half_life_s, injection_to_reference_s); paths relative to the CSV",
    )  # fmt: skip
    parser.add_argument(
        "--pet-units", choices=PET_UNITS, default="SUV",
        help="PET values: SUV (default) or BQML (activity in Bq/ml; the manifest must give the SUV columns)",
    )  # fmt: skip
    parser.add_argument("--tracer", default="", help="tracer name for the metadata table, e.g. FDG or PSMA")
    add_pseudonymize_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.conversion.cli import pseudonym_key_path, report, spec_from_args

    key_path = pseudonym_key_path(args, spec_from_args(args)) if args.pseudonymize else None
    summary, spec = convert_nifti_folders(
        args.input_dir, args.dataset_id, args.name, args.raw_dir, manifest=args.manifest, pet_units=args.pet_units,
        tracer=args.tracer, pseudonym_key=key_path, pet_norm=args.pet_norm, num_processes=args.num_processes,
        overwrite=args.overwrite, progress=not args.no_progress, mask_options=MaskOptions.from_args(args),
        allow_implausible_suv=getattr(args, "allow_implausible_suv", False),
    )  # fmt: skip
    if key_path:
        print(f"pseudonym key (keep it private, outside the dataset): {key_path}")
    return report(summary, spec, args)


if __name__ == "__main__":
    from nnunetv2_l1dfl.conversion.cli import converter_main

    sys.exit(converter_main("dataset_conversion.nifti_folders"))
