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
    lock_dataset,
    prepare_dataset_dir,
    read_records,
    write_case,
    write_dataset_json,
    write_metadata_table,
)
from nnunetv2_l1dfl.conversion.errors import ConversionError, OutputError

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
    # A write into the dataset failed (disk full, read-only): the run stopped there; what and why.
    fault: str | None = None

    def line(self) -> str:
        return (
            f"{self.dataset_dir}: {len(self.converted)} converted, {len(self.skipped)} already done, "
            f"{len(self.failed)} failed, {len(self.skipped_with_reason)} skipped with a reason, "
            f"{self.n_warnings} with warnings; numTraining {self.num_training}"
        )


def _convert_one(
    load_case: Callable[[CaseJob], LoadedCase],
    job: CaseJob,
    dataset_dir: str,
    labels: dict[str, int],
    redactor: Any = None,
) -> tuple[str, Any]:
    """Worker: load and write one case; never raises, returns ("ok", record), ("failed", reason) or
    ("fault", reason) when the dataset itself could not be written (:class:`OutputError`)."""
    if redactor is not None:
        redactor.install()  # a spawned worker: its console output is redacted too
    try:
        case = load_case(job)
        return "ok", write_case(Path(dataset_dir), job.case_id, case, labels, job.patient)
    except OutputError as e:  # the disk, not the case: later cases would fail alike
        logger.debug("case %s: write fault", job.case_id, exc_info=True)
        return "fault", str(e)
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

    Holds the dataset lock (:func:`~nnunetv2_l1dfl.conversion.dataset_folder.lock_dataset`)
    throughout. dataset.json is rewritten first without the cases about to be rewritten, and at the
    end with every finished case, so what nnU-Net lists is complete at every instant. A write fault
    (:class:`~nnunetv2_l1dfl.conversion.errors.OutputError`: disk full, read-only, a file that does
    not read back) stops the run: the remaining cases are reported "not attempted" and
    ``summary.fault`` says why.
    """
    case_ids = [j.case_id for j in jobs]
    duplicates = sorted({c for c in case_ids if case_ids.count(c) > 1})
    if duplicates:
        raise ConversionError(f"duplicate case IDs {duplicates}: the converter produced the same ID twice")
    with lock_dataset(spec):
        return _convert_locked(
            jobs, load_case, spec, num_processes=num_processes, overwrite=overwrite, failed_before=failed_before,
            progress=progress, skipped_before=skipped_before,
        )  # fmt: skip


def _convert_locked(
    jobs: Sequence[CaseJob],
    load_case: Callable[[CaseJob], LoadedCase],
    spec: DatasetSpec,
    *,
    num_processes: int,
    overwrite: bool,
    failed_before: Mapping[str, str] | None,
    progress: bool,
    skipped_before: Mapping[str, str] | None,
) -> ConversionSummary:
    from tqdm import tqdm

    from nnunetv2_l1dfl.conversion.redact import active_redactor

    case_ids = [j.case_id for j in jobs]
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
    finished = set(finished_case_ids(dataset_dir))
    foreign = sorted(finished - set(case_ids) - set(summary.failed))
    if foreign:
        logger.warning(
            "%d case(s) in %s are not produced by this run and stay in the dataset (delete them by hand if "
            "they are stale): %s",
            len(foreign), dataset_dir, ", ".join(foreign[:10]) + (" ..." if len(foreign) > 10 else ""),
        )  # fmt: skip
    # nnU-Net lists the cases of dataset.json only: take the ones about to be rewritten out first,
    # so that it never sees a case whose files are being replaced.
    try:
        write_dataset_json(spec, exclude=[j.case_id for j in todo if j.case_id in finished])
    except OSError as e:
        raise ConversionError(
            f"cannot write {dataset_dir / 'dataset.json'}: {e.strerror or e}; nothing converted"
        ) from e

    def handle(job: CaseJob, status: str, result: Any) -> None:
        if status == "ok":
            summary.converted.append(job.case_id)
            for warning in result["warnings"]:
                logger.warning("case %s: %s", job.case_id, warning)
            return
        summary.failed[job.case_id] = result
        logger.error("case %s (%s) failed: %s", job.case_id, job.source, result)
        if status == "fault" and summary.fault is None:
            summary.fault = result

    bar = tqdm(
        total=len(todo),
        desc=f"converting into {spec.folder_name}",
        unit="case",
        disable=not progress or not todo,
    )
    labels = dict(spec.labels)
    redactor = active_redactor()
    attempted: set[str] = set()
    if num_processes <= 1 or len(todo) <= 1:
        for job in todo:
            if summary.fault:
                break
            attempted.add(job.case_id)
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
                pool.submit(_convert_one, load_case, job, str(dataset_dir), labels, redactor): job for job in todo
            }
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                attempted.add(futures[future].case_id)
                handle(futures[future], *future.result())
                bar.update()
                if summary.fault:  # stop: the disk is full or read-only; queued cases would fail alike
                    for other in futures:
                        other.cancel()
    bar.close()
    if summary.fault:
        for job in todo:
            if job.case_id not in attempted:
                summary.failed[job.case_id] = "not attempted: the run stopped at the write fault above"

    summary.converted.sort()
    try:
        summary.metadata_table = write_metadata_table(dataset_dir)
        records = read_records(dataset_dir)
        summary.n_warnings = sum(1 for r in records if r.get("warnings"))
        summary.num_training = write_dataset_json(spec)["numTraining"]
    except OSError as e:
        # dataset.json stays as written at the start: every case it lists is complete.
        summary.fault = summary.fault or f"cannot write {e.filename or dataset_dir}: {e.strerror or e}"
        logger.error("%s; dataset.json keeps the cases listed before this run", summary.fault)
    return summary
