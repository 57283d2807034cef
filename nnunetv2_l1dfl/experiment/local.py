"""``l1dfl experiment run``: the job graph on this machine.

Preprocessing first (when not done), then the trainings: one at a time per GPU slot
(``CUDA_VISIBLE_DEVICES`` set per child; with ``num_gpus`` N a slot is N GPUs), or one after the
other on CPU; then collect when every training finished. Each child runs in its own process group
with its output in ``<experiment>/logs/<key>.log``; Ctrl-C terminates the children's groups, waits
for them, and a re-run continues (``--c``). Jobs that are running elsewhere (their lock is held, or
they are pending/running in SLURM) are not started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2_l1dfl.experiment.config import Experiment, ExperimentError
from nnunetv2_l1dfl.experiment.jobs import (
    COLLECT,
    PREPROCESS,
    JobLock,
    TrainJob,
    append_event,
    check,
    collect_commands,
    collect_done,
    fold_folder,
    job_environment,
    lock_path,
    log_path,
    preprocess_command,
    preprocess_missing,
    report_folder,
    train_command,
    train_jobs,
    training_done,
    training_progress,
)


class RunInterrupted(Exception):
    """Ctrl-C: children stopped; a re-run continues."""


@dataclass
class Child:
    key: str
    label: str
    commands: list[list[str]]
    env: dict[str, str]
    lock: JobLock
    folder: Path | None = None
    proc: subprocess.Popen | None = None
    started: float = field(default_factory=time.monotonic)
    rc: int | None = None

    def start_next(self, log: Path) -> bool:
        """Start the next command; False when none is left."""
        if not self.commands:
            return False
        cmd = self.commands.pop(0)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} local run (pid {os.getpid()})\n$ "
                    + " ".join(cmd) + "\n")
            f.flush()
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return True


def _stop(children: list[Child], grace_s: float = 30) -> None:
    """SIGTERM to each child's process group (nnU-Net's data-loader workers included), then SIGKILL."""
    for child in children:
        if child.proc is not None and child.proc.poll() is None:
            try:
                os.killpg(child.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # workers that ignored SIGTERM, or outlived their parent
            os.killpg(child.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def gpu_slots(experiment: Experiment, gpus: str | None) -> list[str | None]:
    """One entry per concurrent training: a CUDA_VISIBLE_DEVICES value, or None (CPU: one slot)."""
    if experiment.device == "cpu":
        return [None]
    listed = gpus if gpus is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [g.strip() for g in listed.split(",") if g.strip()]
    if not ids:
        ids = ["0"]
    n = experiment.num_gpus
    if len(ids) < n:
        raise ExperimentError(f"num_gpus {n} per training, but only GPU(s) {','.join(ids)} listed (--gpus)")
    return [",".join(ids[i:i + n]) for i in range(0, len(ids) - n + 1, n)]


class Display:
    """One tqdm bar over the trainings, the running jobs' epochs in its postfix; lines without a terminal."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="l1dfl experiment", unit="job", disable=not enabled or self.lines,
                        bar_format="{desc} {n_fmt}/{total_fmt} |{bar:16}| {elapsed}{postfix}")
        self.enabled = enabled
        self.last = ""

    def event(self, text: str) -> None:
        if self.lines:
            print(f"l1dfl experiment: {text}", file=sys.stderr, flush=True)
        elif self.enabled:
            self.bar.write(f"l1dfl experiment: {text}")

    def note(self, text: str) -> None:
        if text != self.last:
            self.last = text
            self.bar.set_postfix_str(text[:90], refresh=True)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_local(experiment: Experiment, gpus: str | None = None, progress: bool = True, poll_s: float = 2.0) -> dict:
    """Run what is not finished; returns {'done': [...], 'failed': {key: log}, 'skipped': {key: why}}.

    Raises ExperimentError on a failed check (nothing started) and RunInterrupted on Ctrl-C.
    """
    from nnunetv2_l1dfl.experiment.slurm import active_slurm_jobs

    dataset = check(experiment)
    slots = gpu_slots(experiment, gpus)
    try:
        in_slurm = active_slurm_jobs(experiment)
    except ExperimentError:
        in_slurm = {}
    base_env = dict(os.environ, **job_environment(experiment))
    outcome: dict = {"done": [], "failed": {}, "skipped": {}}

    jobs = train_jobs(experiment)
    todo = [j for j in jobs if not training_done(fold_folder(experiment, j, dataset))]
    display = Display(len(todo) + 2, progress)
    running: list[Child] = []

    def acquire(key: str) -> JobLock | None:
        if key in in_slurm:
            outcome["skipped"][key] = f"queued or running in SLURM as job {in_slurm[key]}"
            return None
        lock = JobLock(lock_path(experiment, key))
        if not lock.acquire():
            outcome["skipped"][key] = f"running elsewhere ({lock_path(experiment, key)} is locked)"
            return None
        return lock

    def finish(child: Child) -> None:
        child.lock.release()
        rc = child.rc
        append_event(experiment, child.key, f"END rc={rc} local pid={os.getpid()}")
        ok = rc == 0 and (child.folder is None or training_done(child.folder))
        if ok:
            outcome["done"].append(child.key)
            display.event(f"{child.label} finished ({(time.monotonic() - child.started) / 60:.1f} min)")
        else:
            outcome["failed"][child.key] = str(log_path(experiment, child.key))
            why = f"exit code {rc}" if rc else "nnU-Net wrote no checkpoint_final.pth + validation/summary.json"
            display.event(f"{child.label} failed ({why}); read {log_path(experiment, child.key)}")
        display.advance()

    def launch(key: str, label: str, commands: list[list[str]], env: dict, folder: Path | None) -> Child | None:
        lock = acquire(key)
        if lock is None:
            display.event(f"{label}: not started, {outcome['skipped'][key]}")
            display.advance()
            return None
        child = Child(key, label, commands, env, lock, folder)
        append_event(experiment, key, f"START local pid={os.getpid()} host={os.uname().nodename}")
        child.start_next(log_path(experiment, key))
        display.event(f"{label} started")
        running.append(child)
        return child

    def wait_all() -> None:
        while running:
            for child in list(running):
                rc = child.proc.poll() if child.proc else 0
                if rc is None:
                    continue
                if rc == 0 and child.start_next(log_path(experiment, child.key)):
                    continue
                child.rc = rc
                running.remove(child)
                finish(child)
            notes = []
            for child in running:
                if child.folder is not None:
                    p = training_progress(child.folder)
                    notes.append(f"{child.label} epoch {p.epochs_done}")
                else:
                    notes.append(child.label)
            display.note("; ".join(notes))
            if running:
                time.sleep(poll_s)

    try:
        missing = preprocess_missing(experiment, dataset)
        if missing:
            launch(PREPROCESS, "preprocess", [preprocess_command(experiment, missing)], base_env, None)
            wait_all()
            if preprocess_missing(experiment, dataset):
                raise ExperimentError(f"preprocessing did not finish; read {log_path(experiment, PREPROCESS)}")
            check(experiment, resolve=False)  # folds against the splits nnU-Net wrote
        else:
            display.advance()
        queue: list[TrainJob] = list(todo)
        free = list(slots)
        busy: dict[str, str | None] = {}
        while queue or running:
            while queue and free:
                job = queue.pop(0)
                slot = free.pop(0)
                env = dict(base_env)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                child = launch(job.key, job.label, [train_command(experiment, job)], env,
                               fold_folder(experiment, job, dataset))
                if child is None:
                    free.insert(0, slot)
                else:
                    busy[job.key] = slot
            before = {c.key for c in running}
            # wait for one slot to free up
            while running and {c.key for c in running} == before:
                for child in list(running):
                    rc = child.proc.poll() if child.proc else 0
                    if rc is not None:
                        child.rc = rc
                        running.remove(child)
                        finish(child)
                        free.append(busy.pop(child.key))
                display.note("; ".join(f"{c.label} epoch {training_progress(c.folder).epochs_done}"
                                       for c in running if c.folder is not None))
                if running and {c.key for c in running} == before:
                    time.sleep(poll_s)
        all_trained = all(training_done(fold_folder(experiment, j, dataset)) for j in jobs)
        if all_trained and not collect_done(experiment, dataset):
            commands = collect_commands(experiment)
            if commands:
                report_folder(experiment).mkdir(parents=True, exist_ok=True)
                child = launch(COLLECT, "collect", commands, base_env, None)
                wait_all()
                if child is not None and child.key in outcome["done"]:
                    _copy_find_best(experiment, dataset)
                    (report_folder(experiment) / "collect.done").touch()
            else:
                display.advance()
        elif not all_trained:
            outcome["skipped"].setdefault(COLLECT, "waits for every training")
            display.advance()
        else:
            display.advance()
    except KeyboardInterrupt:
        _stop(running)
        for child in running:
            child.lock.release()
            append_event(experiment, child.key, f"END interrupted local pid={os.getpid()}")
        raise RunInterrupted() from None
    finally:
        display.close()
    return outcome


def _copy_find_best(experiment: Experiment, dataset: str) -> None:
    import shutil

    if not experiment.find_best_configuration:
        return
    results = experiment.nnunet_paths()["nnUNet_results"] / dataset
    target = report_folder(experiment) / "find_best"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("inference_information.json", "inference_instructions.txt"):
        if (results / name).is_file():
            shutil.copy2(results / name, target / name)


def run_collect(experiment: Experiment) -> Path:
    """find_best_configuration + l1dfl compare now, on this machine; returns the report folder.

    Raises ExperimentError when a training is not finished, collect runs elsewhere, or a command fails.
    """
    from nnunetv2_l1dfl.experiment.jobs import dataset_name

    dataset = dataset_name(experiment)
    unfinished = [j.label for j in train_jobs(experiment) if not training_done(fold_folder(experiment, j, dataset))]
    if unfinished:
        raise ExperimentError(f"{len(unfinished)} training(s) not finished ({'; '.join(unfinished[:4])}"
                              f"{' ...' if len(unfinished) > 4 else ''}): run or submit the experiment first")
    lock = JobLock(lock_path(experiment, COLLECT))
    if not lock.acquire():
        raise ExperimentError(f"collect is running elsewhere ({lock_path(experiment, COLLECT)} is locked)")
    env = dict(os.environ, **job_environment(experiment))
    log = log_path(experiment, COLLECT)
    report_folder(experiment).mkdir(parents=True, exist_ok=True)
    append_event(experiment, COLLECT, f"START local pid={os.getpid()} host={os.uname().nodename}")
    child = Child(COLLECT, "collect", collect_commands(experiment), env, lock)
    rc = 0
    try:
        while child.start_next(log):
            rc = child.proc.wait()
            if rc != 0:
                break
    except KeyboardInterrupt:
        _stop([child])
        append_event(experiment, COLLECT, f"END interrupted local pid={os.getpid()}")
        raise RunInterrupted() from None
    finally:
        lock.release()
    append_event(experiment, COLLECT, f"END rc={rc} local pid={os.getpid()}")
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise ExperimentError(f"collect failed (exit {rc}): {tail[0] if tail else ''}; read {log}")
    _copy_find_best(experiment, dataset)
    (report_folder(experiment) / "collect.done").touch()
    return report_folder(experiment)
