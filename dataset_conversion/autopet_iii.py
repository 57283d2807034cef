"""autoPET III/IV (PSMA-FDG-PET-CT-Lesions, FDG + PSMA) into a two-channel nnU-Net dataset.

The release ships almost in nnU-Net layout: ``imagesTr/<tracer>_<patient>_<study>_0000.nii.gz``
(CT resampled to the PET grid, HU), ``_0001`` (PET in SUV), ``labelsTr/<tracer>_<patient>_<study>.nii.gz``
plus ``fdg_metadata.csv`` and ``psma_metadata.csv``. The FDG case names embed TCIA's free-text
study folder (``fdg_01140d52d8_08-13-2005-NA-PET-CT Ganzkoerper  primaer mit KM-56839``, with
spaces), so cases are renamed to ``<tracer>_<patient>_<YYYYMMDD>``, the IDs
:mod:`dataset_conversion.autopet_fdg` gives the same studies; the original name is kept in the
metadata table's ``source`` column. ``--tracer`` selects FDG, PSMA or both; the metadata CSVs are
copied into ``source_metadata/`` and fill the scanner and radionuclide columns.

    python -m dataset_conversion.autopet_iii /data/PSMA-FDG-PET-CT-Lesions -d 224 -n AutoPETIII --tracer psma
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from dataset_conversion.autopet_fdg import copy_source_metadata, load_on_pet_grid, read_source_metadata
from nnunetv2_l1dfl.conversion.case_ids import CaseKey, assign_case_ids, normalize_study_date
from nnunetv2_l1dfl.conversion.dataset_folder import FILE_ENDING, DatasetSpec, resolve_raw_dir
from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.masks import MaskOptions
from nnunetv2_l1dfl.conversion.runner import CaseJob, ConversionSummary, convert_cases

logger = logging.getLogger(__name__)

REFERENCE = "Gatidis et al., PSMA-FDG-PET-CT-Lesions (autoPET III), doi:10.57754/FDAT.6gjsg-zcg93"
TRACERS = ("fdg", "psma")
_CASE_NAME = re.compile(r"^(?P<tracer>fdg|psma)_(?P<subject>[^_]+)_(?P<study>.+)$", re.IGNORECASE)


def convert_autopet_iii(
    input_dir: Path | str,
    dataset_id: int = 224,
    name: str = "AutoPETIII",
    raw_dir: Path | str | None = None,
    *,
    tracer: str = "both",
    pet_norm: str = "CT",
    num_processes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    mask_options: MaskOptions | None = None,
    allow_implausible_suv: bool = False,
) -> tuple[ConversionSummary, DatasetSpec]:
    """Convert the autoPET III/IV release (``tracer``: ``fdg``, ``psma`` or ``both``).

    Label files whose name does not follow ``<tracer>_<patient>_<study>`` are reported as failures
    (with the file name) rather than guessed.
    """
    if tracer not in (*TRACERS, "both"):
        raise ConversionError(f"--tracer must be fdg, psma or both, got {tracer!r}")
    input_dir = Path(input_dir)
    images, labels = input_dir / "imagesTr", input_dir / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise ConversionError(
            f"{input_dir} has no imagesTr/ and labelsTr/: is this the autoPET III/IV release?"
        )
    wanted = TRACERS if tracer == "both" else (tracer,)
    tracer_names = {"fdg": "FDG", "psma": "PSMA"}
    spec = DatasetSpec(
        raw_dir=resolve_raw_dir(raw_dir), dataset_id=dataset_id, name=name, pet_norm=pet_norm,
        description=f"autoPET III/IV whole-body PET/CT lesions, tracer {'FDG + PSMA' if tracer == 'both' else tracer_names[tracer]}",
        extra_json={"reference": REFERENCE, "licence": "CC BY 4.0 / see the source", "tracer": "+".join(tracer_names[t] for t in wanted)},
    )  # fmt: skip
    csv_paths = sorted(p for p in input_dir.glob("*.csv") if "metadata" in p.name.lower())
    metadata = read_source_metadata(csv_paths)

    failed: dict[str, str] = {}
    keys: dict[str, CaseKey] = {}
    for label_path in sorted(labels.glob(f"*{FILE_ENDING}")):
        original = label_path.name[: -len(FILE_ENDING)]
        match = _CASE_NAME.match(original)
        if not match:
            failed[original] = f"{label_path}: name is not <fdg|psma>_<patient>_<study>"
            continue
        if match["tracer"].lower() not in wanted:
            continue
        keys[original] = CaseKey(
            patient_id=match["subject"].lower(),
            study_date=match["study"],
            discriminator=original,
            prefix=match["tracer"].lower(),
        )
    if not keys and not failed:
        raise ConversionError(f"no {'/'.join(wanted)} cases in {labels}")
    case_ids = assign_case_ids(keys.values())
    jobs = []
    for original, key in keys.items():
        date = normalize_study_date(key.study_date)
        entry = metadata.get((key.patient_id, date), {})
        tracer_name = tracer_names[key.prefix]
        if entry.get("radionuclide"):
            tracer_name += f" ({entry['radionuclide']})"
        patient = f"{'PETCT' if key.prefix == 'fdg' else 'PSMA'}_{key.patient_id}"  # the CSVs' Subject ID
        jobs.append(
            CaseJob(
                case_id=case_ids[key],
                patient=patient,
                source=original,
                payload={
                    "ct": images / f"{original}_0000{FILE_ENDING}",
                    "pet": images / f"{original}_0001{FILE_ENDING}",
                    "label": labels / f"{original}{FILE_ENDING}",
                    "mask_options": mask_options,
                    "metadata": {
                        "allow_implausible_suv": allow_implausible_suv,
                        "patient": patient,
                        "study_date": date,
                        "tracer": tracer_name,
                        "scanner": entry.get("scanner", ""),
                        "suv_branch": "precomputed: autoPET III SUV channel",
                        "source": original,
                    },
                },
            )
        )
    summary = convert_cases(
        jobs, load_on_pet_grid, spec, num_processes=num_processes, overwrite=overwrite, failed_before=failed,
        progress=progress,
    )  # fmt: skip
    copy_source_metadata(csv_paths, spec.dataset_dir)
    return summary, spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracer",
        choices=(*TRACERS, "both"),
        default="both",
        help="which studies to convert (default: both)",
    )


def run(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.conversion.cli import report

    summary, spec = convert_autopet_iii(
        args.input_dir, args.dataset_id, args.name, args.raw_dir, tracer=args.tracer, pet_norm=args.pet_norm,
        num_processes=args.num_processes, overwrite=args.overwrite, progress=not args.no_progress,
        mask_options=MaskOptions.from_args(args),
        allow_implausible_suv=args.allow_implausible_suv,
    )  # fmt: skip
    return report(summary, spec, args)


if __name__ == "__main__":
    from nnunetv2_l1dfl.conversion.cli import converter_main

    sys.exit(converter_main("dataset_conversion.autopet_iii"))
