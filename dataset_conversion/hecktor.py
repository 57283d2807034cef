"""HECKTOR (head-and-neck FDG PET/CT) into a two-channel nnU-Net dataset, labels GTVp = 1, GTVn = 2.

Layout (2022 and later): ``<id>__CT.nii.gz`` and ``<id>__PT.nii.gz`` (PET already in SUV) in any
sub-folder (``imagesTr/`` or one folder per centre or case), the label ``<id>.nii.gz`` (or
``<id>__gt``, ``<id>__label``, ``<id>_gtvt``) anywhere under INPUT_DIR. CT and label are on the CT
grid, PET on its own coarser grid: both are resampled onto the PET grid (CT linear, label as
per-label fraction maps). Case IDs are the HECKTOR IDs (``CHUM-001``); the centre (the part
before the dash) fills the ``scanner`` column as ``centre CHUM`` (HECKTOR names no scanner). A PET without a label (test
cases) is reported as failed with that reason.

    python -m dataset_conversion.hecktor /data/hecktor2022/training -d 602 -n HECKTOR2022
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nnunetv2_l1dfl.conversion.case_ids import CaseKey, assign_case_ids
from nnunetv2_l1dfl.conversion.dataset_folder import DatasetSpec, LoadedCase, resolve_raw_dir
from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.image_io import read_image
from nnunetv2_l1dfl.conversion.masks import MaskOptions, labels_from_image
from nnunetv2_l1dfl.conversion.resample import place_on_pet_grid
from nnunetv2_l1dfl.conversion.runner import CaseJob, ConversionSummary, convert_cases

logger = logging.getLogger(__name__)

LABELS = {"background": 0, "GTVp": 1, "GTVn": 2}
LABEL_SUFFIXES = ("", "__gt", "__GT", "__label", "_gtvt")
REFERENCE = "HECKTOR challenge (MICCAI), https://hecktor.grand-challenge.org"


def load_hecktor_case(job: CaseJob) -> LoadedCase:
    """Worker: payload has ``ct``, ``pet``, ``label`` paths, ``mask_options`` and ``metadata``."""
    p = job.payload
    options = p.get("mask_options") or MaskOptions()
    pet = read_image(p["pet"], "PET (__PT)", job.case_id)
    ct = read_image(p["ct"], "CT (__CT)", job.case_id)
    # Integer values 0/1 (GTVp)/2 (GTVn) only; each value keeps its own lesion accounting.
    label = labels_from_image(
        read_image(p["label"], "label", job.case_id), p["label"], options, allowed=list(LABELS.values())
    )
    ct, label, warnings = place_on_pet_grid(
        ct, label.label, pet, job.case_id, options, structures=label.structures, ct_name=f"CT {p['ct']}"
    )
    return LoadedCase(ct=ct, pet=pet, label=label, metadata=dict(p["metadata"]), warnings=warnings)


def convert_hecktor(
    input_dir: Path | str,
    dataset_id: int = 602,
    name: str = "HECKTOR",
    raw_dir: Path | str | None = None,
    *,
    pet_norm: str = "CT",
    num_processes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    mask_options: MaskOptions | None = None,
    allow_implausible_suv: bool = False,
) -> tuple[ConversionSummary, DatasetSpec]:
    """Convert a HECKTOR training folder (see the module docstring for the layout); ``mask_options``:
    lesion accounting, ``--mask-threshold`` and CT coverage (:class:`MaskOptions`)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"input folder not found: {input_dir}")
    images = sorted(input_dir.rglob("*.nii.gz"))
    by_name = {}
    for path in images:
        by_name.setdefault(path.name, []).append(path)
    pets = [p for p in images if p.name.endswith("__PT.nii.gz")]
    if not pets:
        raise ConversionError(f"no <id>__PT.nii.gz under {input_dir}: is this a HECKTOR folder?")
    spec = DatasetSpec(
        raw_dir=resolve_raw_dir(raw_dir), dataset_id=dataset_id, name=name, labels=dict(LABELS), pet_norm=pet_norm,
        description="HECKTOR head-and-neck FDG PET/CT, primary tumour (GTVp) and nodes (GTVn)",
        extra_json={"reference": REFERENCE, "licence": "see the HECKTOR data licence", "tracer": "FDG"},
    )  # fmt: skip
    keys = {pet: CaseKey(patient_id=pet.name[: -len("__PT.nii.gz")]) for pet in pets}
    case_ids = assign_case_ids(keys.values())
    failed: dict[str, str] = {}
    jobs = []
    for pet, key in keys.items():
        hecktor_id = key.patient_id
        ct = pet.with_name(f"{hecktor_id}__CT.nii.gz")
        candidates = [p for s in LABEL_SUFFIXES for p in by_name.get(f"{hecktor_id}{s}.nii.gz", [])]
        if not ct.is_file():
            failed[case_ids[key]] = f"no CT {ct.name} next to {pet}"
            continue
        if len(candidates) != 1:
            failed[case_ids[key]] = (
                f"{'no' if not candidates else 'more than one'} label for {hecktor_id} under {input_dir} "
                f"(looked for {', '.join(hecktor_id + s + '.nii.gz' for s in LABEL_SUFFIXES)})"
                + (f": {', '.join(map(str, candidates))}" if candidates else "")
            )
            continue
        jobs.append(
            CaseJob(
                case_id=case_ids[key],
                patient=hecktor_id,
                source=str(pet),
                payload={
                    "ct": ct,
                    "pet": pet,
                    "label": candidates[0],
                    "mask_options": mask_options,
                    "metadata": {
                        "allow_implausible_suv": allow_implausible_suv,
                        "patient": hecktor_id,
                        "tracer": "FDG",
                        "scanner": f"centre {hecktor_id.split('-')[0]}",
                        "suv_branch": "precomputed: HECKTOR __PT in SUV",
                        "source": str(pet.relative_to(input_dir)),
                    },
                },
            )  # fmt: skip
        )
    summary = convert_cases(
        jobs, load_hecktor_case, spec, num_processes=num_processes, overwrite=overwrite, failed_before=failed,
        progress=progress,
    )  # fmt: skip
    return summary, spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """HECKTOR has no options beyond the common ones."""


def run(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.conversion.cli import report

    summary, spec = convert_hecktor(
        args.input_dir, args.dataset_id, args.name, args.raw_dir, pet_norm=args.pet_norm,
        num_processes=args.num_processes, overwrite=args.overwrite, progress=not args.no_progress,
        mask_options=MaskOptions.from_args(args),
        allow_implausible_suv=args.allow_implausible_suv,
    )  # fmt: skip
    return report(summary, spec, args)


if __name__ == "__main__":
    from nnunetv2_l1dfl.conversion.cli import converter_main

    sys.exit(converter_main("dataset_conversion.hecktor"))
