"""Running a conversion: every case of a converter through load -> check -> atomic write, in parallel.

A converter (``dataset_conversion/*.py``) turns its source into a list of :class:`CaseJob` and a
picklable ``load_case(job) -> LoadedCase`` function that returns CT, PET and label as SimpleITK
images on the PET grid. :func:`convert_cases` does the rest: skips finished cases, writes each case
atomically (:func:`~nnunetv2_l1dfl.conversion.dataset_folder.write_case`), collects failures per
case with their reason (the run goes on), and writes dataset.json and the metadata table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunetv2_l1dfl.conversion.dataset_folder import (
    DatasetSpec,
    LoadedCase,
    finished_case_ids,
    is_case_finished,
    prepare_dataset_dir,
    read_records,
    write_case,
    write_dataset_json,
    write_metadata_table,
)
from nnunetv2_l1dfl.conversion.errors import ConversionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseJob:
    """One case to convert: its ID, the patient key used for splits, and the loader's input.

    source: a short human-readable description of the input (folder, series UID) for messages.
    payload: whatever the converter's ``load_case`` needs; must be picklable for ``-np`` > 1.
    """

    case_id: str
    patient: str
    source: str
    payload: Any = None




@dataclass
class ConversionSummary:
    dataset_dir: Path
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    # Inputs the converter deliberately did not convert, with the reason (e.g. a non-attenuation-
    # corrected PET next to the corrected one); ``skipped`` above are cases already finished.
    skipped_with_reason: dict[str, str] = field(default_factory=dict)
    n_warnings: int = 0
    num_training: int = 0
    metadata_table: Path | None = None
    splits_file: Path | None = None

    def line(self) -> str:
        return (
            f"{self.dataset_dir}: {len(self.converted)} converted, {len(self.skipped)} already done, "
            f"{len(self.failed)} failed, {len(self.skipped_with_reason)} skipped with a reason, "
            f"{self.n_warnings} with warnings; numTraining {self.num_training}"
        )


def _convert_one(
    load_case: Callable[[CaseJob], LoadedCase], job: CaseJob, dataset_dir: str, labels: dict[str, int]
) -> tuple[str, Any]:
    """Worker: load and write one case; never raises, returns ("ok", record) or ("failed", reason)."""
    try:
        case = load_case(job)
        return "ok", write_case(Path(dataset_dir), job.case_id, case, labels, job.patient)
    except Exception as e:  # a failing case must not stop the run: report it with its reason
        logger.debug("case %s failed", job.case_id, exc_info=True)
        reason = str(e) if isinstance(e, ConversionError) else f"{type(e).__name__}: {e}"
        return "failed", reason


def convert_cases(
    jobs: Sequence[CaseJob],
    load_case: Callable[[CaseJob], LoadedCase],
    spec: DatasetSpec,
    *,
    num_processes: int = 1,
    overwrite: bool = False,
    failed_before: Mapping[str, str] | None = None,
    progress: bool = True,
    skipped_before: Mapping[str, str] | None = None,
) -> ConversionSummary:
    """Convert every job into ``spec``'s dataset; write dataset.json and the metadata table.

    Finished cases are skipped unless ``overwrite``; ``num_processes`` > 1 uses that many worker
    processes (spawned: ``load_case`` must be a module-level function). ``failed_before`` holds
    cases the converter already could not turn into a job (reported alongside), ``skipped_before``
    inputs it chose not to convert, with the reason (counted in the summary). Never raises for
    a single case; see ``summary.failed``.
    """
    from tqdm import tqdm

    case_ids = [j.case_id for j in jobs]
    duplicates = sorted({c for c in case_ids if case_ids.count(c) > 1})
    if duplicates:
        raise ConversionError(f"duplicate case IDs {duplicates}: the converter produced the same ID twice")
    dataset_dir = prepare_dataset_dir(spec)
    summary = ConversionSummary(
        dataset_dir=dataset_dir, failed=dict(failed_before or {}), skipped_with_reason=dict(skipped_before or {})
    )
    todo = []
    for job in jobs:
        if not overwrite and is_case_finished(dataset_dir, job.case_id):
            summary.skipped.append(job.case_id)
        else:
            todo.append(job)
    foreign = sorted(set(finished_case_ids(dataset_dir)) - set(case_ids) - set(summary.failed))
    if foreign:
        logger.warning(
            "%d case(s) in %s are not produced by this run and stay in the dataset (delete them by hand if "
            "they are stale): %s",
            len(foreign), dataset_dir, ", ".join(foreign[:10]) + (" ..." if len(foreign) > 10 else ""),
        )  # fmt: skip

    def handle(job: CaseJob, status: str, result: Any) -> None:
        if status == "ok":
            summary.converted.append(job.case_id)
            for warning in result["warnings"]:
                logger.warning("case %s: %s", job.case_id, warning)
        else:
            summary.failed[job.case_id] = result
            logger.error("case %s (%s) failed: %s", job.case_id, job.source, result)

    bar = tqdm(
        total=len(todo),
        desc=f"converting into {spec.folder_name}",
        unit="case",
        disable=not progress or not todo,
    )
    labels = dict(spec.labels)
    if num_processes <= 1 or len(todo) <= 1:
        for job in todo:
            handle(job, *_convert_one(load_case, job, str(dataset_dir), labels))
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: SimpleITK's and ITK's thread pools do not survive a fork reliably.
        with ProcessPoolExecutor(
            max_workers=num_processes, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = {
                pool.submit(_convert_one, load_case, job, str(dataset_dir), labels): job for job in todo
            }
            for future in as_completed(futures):
                handle(futures[future], *future.result())
                bar.update()
    bar.close()

    summary.converted.sort()
    summary.metadata_table = write_metadata_table(dataset_dir)
    records = read_records(dataset_dir)
    summary.n_warnings = sum(1 for r in records if r.get("warnings"))
    summary.num_training = write_dataset_json(spec)["numTraining"]
    return summary
