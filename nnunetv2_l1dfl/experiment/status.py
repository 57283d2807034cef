"""What each job of an experiment is doing: from nnU-Net's files, the job files, squeue and scontrol.

No accounting database is needed (``sacct`` is not used): a job's state comes from, in order, its
finished outputs (done), its lock (running locally or in a SLURM job on a node that shares the lock
file), ``squeue`` / ``scontrol`` for its latest SLURM job, and its last START / END event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_l1dfl.experiment.config import Experiment, ExperimentError
from nnunetv2_l1dfl.experiment.jobs import (
    COLLECT,
    PREPROCESS,
    collect_done,
    dataset_name,
    fold_folder,
    last_event,
    lock_held,
    log_path,
    preprocess_missing,
    train_jobs,
    training_done,
    training_progress,
)

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED"}


@dataclass
class JobStatus:
    key: str
    label: str
    state: str
    epochs: str = ""
    best_ema_dice: float | None = None
    slurm_id: str = ""
    log_tail: list[str] | None = None

    @property
    def failed(self) -> bool:
        return self.state.startswith(("failed", "cancelled", "lost", "interrupted"))


def _tail(path: Path, n: int = 6) -> list[str]:
    if not path.is_file():
        return [f"(no log at {path})"]
    lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-n:]


def _state(experiment: Experiment, key: str, done: bool, slurm: dict[str, tuple[str, str]],
           started: bool) -> tuple[str, str]:
    job_id, slurm_state = slurm.get(key, ("", ""))
    if done:
        return "done", job_id
    holder = lock_held(experiment, key)
    if slurm_state == "NEVER":
        return "blocked (slurm: a job it waits for failed; submit again)", job_id
    if slurm_state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING"):
        return "pending (slurm)", job_id
    if slurm_state in ("RUNNING", "COMPLETING"):
        return "running (slurm)", job_id
    if holder is not None:
        return f"running ({holder})", job_id
    event = last_event(experiment, key) or ""
    if slurm_state in FAILED_STATES:
        return f"{'cancelled' if slurm_state == 'CANCELLED' else 'failed'} (slurm {slurm_state})", job_id
    if " END rc=0" in event:
        return ("failed (exit 0 without the expected outputs)" if key != PREPROCESS else "failed (incomplete)"), job_id
    if " END interrupted" in event:
        return "interrupted (re-run continues)", job_id
    if " END rc=" in event:
        return f"failed (exit {event.split(' END rc=', 1)[1].split()[0]})", job_id
    if " START" in event or " SIGNAL" in event:
        return "lost (started, no end recorded)", job_id
    return ("partial (re-run continues)" if started else "not started"), job_id


def experiment_status(experiment: Experiment) -> list[JobStatus]:
    """One row per job: preprocess, every training, collect."""
    from nnunetv2_l1dfl.experiment.slurm import slurm_states

    dataset = dataset_name(experiment)
    try:
        slurm = slurm_states(experiment)
    except ExperimentError as e:
        slurm = {}
        rows_note = str(e)
    else:
        rows_note = ""
    cache = experiment.folder / "trainers.json"
    trainers = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    rows = []
    pre_done = not preprocess_missing(experiment, dataset)
    state, job_id = _state(experiment, PREPROCESS, pre_done, slurm, False)
    rows.append(JobStatus(PREPROCESS, "preprocess", state, slurm_id=job_id))
    all_done = True
    for job in train_jobs(experiment):
        folder = fold_folder(experiment, job, dataset)
        done = training_done(folder)
        all_done &= done
        progress = training_progress(folder)
        state, job_id = _state(experiment, job.key, done, slurm, progress.logs > 0)
        total = progress.num_epochs or trainers.get(job.trainer, {}).get("num_epochs")
        epochs = f"{progress.epochs_done}/{total if total else '?'}"
        rows.append(JobStatus(job.key, job.label, state, epochs, progress.best_ema_dice, job_id))
    state, job_id = _state(experiment, COLLECT, all_done and collect_done(experiment, dataset), slurm, False)
    rows.append(JobStatus(COLLECT, "collect", state, slurm_id=job_id))
    for row in rows:
        if row.failed:
            row.log_tail = _tail(log_path(experiment, row.key))
    if rows_note:
        rows[0].state += f" [{rows_note}]"
    return rows


def format_table(rows: list[JobStatus]) -> str:
    header = ("job", "state", "epoch", "best EMA Dice", "slurm job")
    table = [header] + [(r.label, r.state, r.epochs, "" if r.best_ema_dice is None else f"{r.best_ema_dice:.4f}",
                         r.slurm_id) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if r.log_tail:
            lines.append(f"--- {r.label}: last lines of its log")
            lines += [f"    {ln}" for ln in r.log_tail]
    return "\n".join(lines)
