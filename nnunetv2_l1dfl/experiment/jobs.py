"""The job graph of an experiment, what is done, and the checks made before anything starts.

Jobs: ``preprocess`` (nnU-Net planning and preprocessing, skipped when done) -> one ``train`` job
per (trainer, configuration, fold) -> ``collect`` (``nnUNetv2_find_best_configuration`` and
``l1dfl compare``). What is done is read from nnU-Net's own files, never from a private marker:

- preprocess: the plans file, the preprocessed ``dataset.json`` and one case file per training case
  in every configuration's data folder;
- train: ``checkpoint_final.pth`` and ``validation/summary.json`` in the fold folder (a final
  checkpoint without validation is continued with ``--c``, which validates again);
- collect: ``report/collect.done`` newer than every ``checkpoint_final.pth`` of the experiment.

Every run of a job appends lines to ``<experiment>/jobs/<key>.events`` (START / END rc) and holds an
``flock`` on ``<experiment>/locks/<key>.lock`` while it runs, locally and in SLURM jobs alike, so
that a job that is running is never started twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_l1dfl.experiment.config import Experiment, ExperimentError

PREPROCESS, COLLECT = "preprocess", "collect"


@dataclass(frozen=True)
class TrainJob:
    trainer: str
    configuration: str
    fold: int

    @property
    def key(self) -> str:
        return f"{self.trainer}__{self.configuration}__fold{self.fold}"

    @property
    def label(self) -> str:
        return f"{self.trainer} {self.configuration} fold {self.fold}"


def train_jobs(experiment: Experiment) -> list[TrainJob]:
    """The trainings in a stable order (configuration, fold, trainer): the SLURM array index is the position."""
    return [TrainJob(t, c, f) for c in experiment.configurations for f in experiment.folds for t in experiment.trainers]


# --------------------------------------------------------------------------------------------------
# nnU-Net folders
# --------------------------------------------------------------------------------------------------
def dataset_name(experiment: Experiment) -> str:
    """``DatasetXXX_Name`` of the experiment's dataset, found in nnUNet_raw, _preprocessed or _results."""
    prefix = f"Dataset{experiment.dataset:03d}_"
    paths = experiment.nnunet_paths()
    for key in ("nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results"):
        folder = paths[key]
        if folder.is_dir():
            found = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix))
            if len(found) > 1:
                raise ExperimentError(f"{folder}: several folders for dataset {experiment.dataset}: {found}")
            if found:
                return found[0]
    raise ExperimentError(f"dataset {experiment.dataset}: no {prefix}* folder in {paths['nnUNet_raw']} or "
                          f"{paths['nnUNet_preprocessed']}")


def fold_folder(experiment: Experiment, job: TrainJob, dataset: str) -> Path:
    return (experiment.nnunet_paths()["nnUNet_results"] / dataset /
            f"{job.trainer}__{experiment.plans}__{job.configuration}" / f"fold_{job.fold}")


def training_done(folder: Path) -> bool:
    return (folder / "checkpoint_final.pth").is_file() and (folder / "validation" / "summary.json").is_file()


def preprocess_missing(experiment: Experiment, dataset: str) -> list[str]:
    """What preprocessing still has to produce (empty when done): 'plans' and/or configuration names."""
    paths = experiment.nnunet_paths()
    base = paths["nnUNet_preprocessed"] / dataset
    plans_file = base / f"{experiment.plans}.json"
    if not plans_file.is_file() or not (base / "dataset.json").is_file():
        return ["plans", *experiment.configurations]
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    raw_json = paths["nnUNet_raw"] / dataset / "dataset.json"
    n_cases = json.loads(raw_json.read_text(encoding="utf-8")).get("numTraining") if raw_json.is_file() else None
    missing = []
    for configuration in experiment.configurations:
        config = plans.get("configurations", {}).get(configuration)
        if config is None:
            missing.append(configuration)
            continue
        identifier = config.get("data_identifier", f"{experiment.plans}_{configuration}")
        data = base / identifier
        cases = len(list(data.glob("*.pkl"))) if data.is_dir() else 0
        if cases == 0 or (n_cases is not None and cases < n_cases):
            missing.append(configuration)
    return missing


def number_of_folds(experiment: Experiment, dataset: str) -> tuple[int, str]:
    """Folds available: from splits_final.json when it exists, else nnU-Net's default 5-fold split."""
    splits = experiment.nnunet_paths()["nnUNet_preprocessed"] / dataset / "splits_final.json"
    if splits.is_file():
        return len(json.loads(splits.read_text(encoding="utf-8"))), str(splits)
    return 5, "nnU-Net's default 5-fold split (no splits_final.json yet)"


def collect_done(experiment: Experiment, dataset: str) -> bool:
    marker = report_folder(experiment) / "collect.done"
    if not marker.is_file():
        return False
    stamp = marker.stat().st_mtime
    for job in train_jobs(experiment):
        final = fold_folder(experiment, job, dataset) / "checkpoint_final.pth"
        if not final.is_file() or final.stat().st_mtime > stamp:
            return False
    return True


def report_folder(experiment: Experiment) -> Path:
    return experiment.folder / "report"


# --------------------------------------------------------------------------------------------------
# Environment and commands
# --------------------------------------------------------------------------------------------------
def package_trainer_folder() -> Path:
    import nnunetv2_l1dfl

    return Path(nnunetv2_l1dfl.__file__).resolve().parent / "nnunet_trainers"


def job_environment(experiment: Experiment) -> dict[str, str]:
    """The variables every job sets: nnU-Net's three folders, nnUNet_extTrainer (the user's trainer folders
    first, then this package's), and PYTHONPATH when the package runs from a checkout."""
    import nnunetv2_l1dfl
    from nnunetv2_l1dfl.demo import checkout_root

    env = {k: str(v) for k, v in experiment.nnunet_paths().items()}
    env["nnUNet_extTrainer"] = os.pathsep.join([str(p) for p in experiment.trainer_folders] +
                                               [str(package_trainer_folder())])
    checkout = checkout_root(Path(nnunetv2_l1dfl.__file__))
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join([checkout] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p and p != checkout])
    return env


#: nnU-Net console scripts and the functions behind them (used when the script is not beside the interpreter).
_ENTRY_POINTS = {
    "nnUNetv2_plan_and_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                     "plan_and_preprocess_entry"),
    "nnUNetv2_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "preprocess_entry"),
    "nnUNetv2_train": ("nnunetv2.run.run_training", "run_training_entry"),
    "nnUNetv2_find_best_configuration": ("nnunetv2.evaluation.find_best_configuration",
                                         "find_best_configuration_entry_point"),
}


def nnunet_command(name: str) -> list[str]:
    """The nnU-Net console script ``name`` of this interpreter's environment (what users type), else
    ``python -c`` calling its entry function (a module's ``__main__`` is not always the entry point)."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    module, function = _ENTRY_POINTS[name]
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; "
            f"sys.exit({function}())"]


def preprocess_command(experiment: Experiment, missing: list[str]) -> list[str]:
    """Plan and preprocess when the plans are missing; otherwise preprocess only the missing configurations."""
    configs = [c for c in missing if c != "plans"] or list(experiment.configurations)
    nproc = [str(experiment.preprocess_processes)] * len(configs)
    if "plans" in missing:
        cmd = nnunet_command("nnUNetv2_plan_and_preprocess") + ["-d", str(experiment.dataset), "-c", *configs, "-np", *nproc,
               "-npfp", str(experiment.preprocess_processes)]
        if experiment.plans != "nnUNetPlans":
            cmd += ["-overwrite_plans_name", experiment.plans]
        if experiment.verify_dataset_integrity:
            cmd.append("--verify_dataset_integrity")
        return cmd
    return nnunet_command("nnUNetv2_preprocess") + ["-d", str(experiment.dataset), "-plans_name", experiment.plans, "-c", *configs, "-np", *nproc]


def train_command(experiment: Experiment, job: TrainJob) -> list[str]:
    """``nnUNetv2_train`` with ``--c``: a new training starts (nnU-Net warns), an interrupted one continues."""
    cmd = nnunet_command("nnUNetv2_train") + [str(experiment.dataset), job.configuration, str(job.fold), "-tr", job.trainer, "-p", experiment.plans, "-device", experiment.device]
    if experiment.num_gpus > 1:
        cmd += ["-num_gpus", str(experiment.num_gpus)]
    if experiment.npz:
        cmd.append("--npz")
    return cmd + ["--c"]


def collect_commands(experiment: Experiment) -> list[list[str]]:
    """find_best_configuration (over all trainers and configurations), then one l1dfl compare per configuration."""
    commands = []
    folds = [str(f) for f in experiment.folds]
    if experiment.find_best_configuration:
        cmd = nnunet_command("nnUNetv2_find_best_configuration") + [str(experiment.dataset), "-c", *experiment.configurations, "-tr", *experiment.trainers, "-p", experiment.plans, "-f", *folds,
               "-np", str(experiment.preprocess_processes)]
        if not (experiment.ensembling and experiment.npz) or len(experiment.trainers) * len(experiment.configurations) < 2:
            cmd.append("--disable_ensembling")
        commands.append(cmd)
    if experiment.compare and len(experiment.trainers) >= 2:
        for configuration in experiment.configurations:
            commands.append([sys.executable, "-m", "nnunetv2_l1dfl.cli", "compare", "-d", str(experiment.dataset),
                             "-c", configuration, "-tr", *experiment.trainers, "-p", experiment.plans, "-f", *folds,
                             "-o", str(report_folder(experiment) / configuration), "--overwrite",
                             *experiment.compare_args])
    return commands


# --------------------------------------------------------------------------------------------------
# Checks before anything starts
# --------------------------------------------------------------------------------------------------
_RESOLVE = r"""
import contextlib, io, json, os, sys, tempfile
names, plans_file, dataset_json_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {}
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
for name in names:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cls = recursive_find_trainer_class_by_name(name)
    except BaseException as e:
        out[name] = {"error": str(e).splitlines()[0][:300]}
        continue
    # nnU-Net drops modules of external folders from sys.modules after the lookup: take the file from code
    code = [v.__code__ for v in vars(cls).values() if hasattr(v, "__code__")]
    module = sys.modules.get(cls.__module__)
    entry = {"module": cls.__module__,
             "file": getattr(module, "__file__", None) or (code[0].co_filename if code else None)}
    if os.path.isfile(plans_file) and os.path.isfile(dataset_json_file):
        try:  # the epoch count is set in __init__; a throw-away instance (results in a temp folder) tells it
            import torch
            with open(plans_file) as f:
                plans = json.load(f)
            with open(dataset_json_file) as f:
                dataset_json = json.load(f)
            plans["continue_training"] = False  # as nnU-Net's get_trainer_from_args sets it
            config = next(iter(plans["configurations"]))
            with contextlib.redirect_stdout(io.StringIO()):
                entry["num_epochs"] = int(cls(plans=plans, configuration=config, fold=0, dataset_json=dataset_json,
                                              device=torch.device("cpu")).num_epochs)
        except BaseException:
            pass
    out[name] = entry
print("L1DFL_RESOLVE " + json.dumps(out))
"""


def resolve_trainers(experiment: Experiment, dataset: str | None) -> dict[str, dict]:
    """Look every trainer up with nnU-Net's own ``recursive_find_trainer_class_by_name``, in a subprocess
    with the jobs' environment (nnU-Net reads ``nnUNet_extTrainer`` at import). Raises ExperimentError
    naming the unknown trainer(s). The result (module, file, num_epochs when preprocessed) is cached in
    ``<experiment>/trainers.json`` for ``status``."""
    env = dict(os.environ, **job_environment(experiment))
    base = experiment.nnunet_paths()["nnUNet_preprocessed"] / (dataset or "none")
    with tempfile.TemporaryDirectory(prefix="l1dfl_resolve_") as tmp:
        env["nnUNet_results"] = tmp  # a throw-away trainer instance writes its log there
        result = subprocess.run([sys.executable, "-c", _RESOLVE, json.dumps(experiment.trainers),
                                 str(base / f"{experiment.plans}.json"), str(base / "dataset.json")],
                                env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("L1DFL_RESOLVE ")), None)
    if line is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExperimentError(f"the trainer lookup failed (exit {result.returncode}): {tail[0]}")
    found = json.loads(line.split(" ", 1)[1])
    unknown = [name for name, entry in found.items() if "error" in entry]
    if unknown:
        raise ExperimentError(f"{experiment.path}: trainer(s) {', '.join(unknown)} not found by nnU-Net's lookup "
                              f"(nnunetv2's trainer folder, then nnUNet_extTrainer={env['nnUNet_extTrainer']}); "
                              "add the folder holding them to [paths] trainer_folders")
    experiment.folder.mkdir(parents=True, exist_ok=True)
    (experiment.folder / "trainers.json").write_text(json.dumps(found, indent=1), encoding="utf-8")
    return found


def check(experiment: Experiment, *, resolve: bool = True) -> str:
    """Everything that must hold before a job starts; returns the dataset folder name.

    Trainers resolve through nnU-Net's lookup; folds exist in splits_final.json (or the default 5
    folds); the dataset is preprocessed, or preprocessing is allowed and the raw dataset exists.
    """
    dataset = dataset_name(experiment)
    paths = experiment.nnunet_paths()
    missing = preprocess_missing(experiment, dataset)
    if missing and not experiment.preprocess_allowed:
        raise ExperimentError(f"{paths['nnUNet_preprocessed'] / dataset}: dataset {dataset} is not preprocessed "
                              f"({', '.join(missing)} missing) and [preprocess] allowed = false")
    if missing and not (paths["nnUNet_raw"] / dataset / "dataset.json").is_file():
        raise ExperimentError(f"{paths['nnUNet_raw'] / dataset / 'dataset.json'}: missing; preprocessing "
                              f"({', '.join(missing)}) needs the raw dataset")
    n_folds, source = number_of_folds(experiment, dataset)
    outside = [f for f in experiment.folds if f >= n_folds]
    if outside:
        raise ExperimentError(f"{experiment.path}: fold(s) {outside} outside the {n_folds} folds of {source}; "
                              "nnU-Net would train a random 80:20 split instead")
    if resolve:
        resolve_trainers(experiment, dataset)
    return dataset


# --------------------------------------------------------------------------------------------------
# Locks, events and training logs
# --------------------------------------------------------------------------------------------------
def lock_path(experiment: Experiment, key: str) -> Path:
    return experiment.folder / "locks" / f"{key}.lock"


def events_path(experiment: Experiment, key: str) -> Path:
    return experiment.folder / "jobs" / f"{key}.events"


def log_path(experiment: Experiment, key: str) -> Path:
    """Output of local runs (SLURM jobs write ``logs/slurm/<key>_<jobid>.out``)."""
    return experiment.folder / "logs" / f"{key}.log"


class JobLock:
    """``flock`` on the job's lock file, held while the job runs (the SLURM scripts take the same lock)."""

    def __init__(self, path: Path):
        self.path, self.handle = path, None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid={os.getpid()} host={os.uname().nodename}\n")
        handle.flush()
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def lock_held(experiment: Experiment, key: str) -> str | None:
    """Who holds the job's lock (its content) when a process holds it now, else None."""
    path = lock_path(experiment, key)
    if not path.is_file():
        return None
    lock = JobLock(path)
    if lock.acquire():
        lock.release()
        return None
    return path.read_text(encoding="utf-8", errors="replace").strip() or "another process"


def append_event(experiment: Experiment, key: str, text: str) -> None:
    path = events_path(experiment, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")


def last_event(experiment: Experiment, key: str) -> str | None:
    path = events_path(experiment, key)
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else None


_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_EPOCH_TIME = re.compile(r": Epoch time: ")
_BEST_EMA = re.compile(r"New best EMA pseudo Dice: ([0-9.eE+-]+|nan)")
_VAL_DICE = re.compile(r"Mean Validation Dice:\s+([0-9.eE+-]+|nan)")


@dataclass
class TrainingProgress:
    epochs_done: int = 0
    best_ema_dice: float | None = None
    validation_dice: float | None = None
    logs: int = 0
    first_epoch_of_last_log: int | None = None
    num_epochs: int | None = None


def training_progress(folder: Path) -> TrainingProgress:
    """Epochs finished, best EMA pseudo Dice and mean validation Dice, from nnU-Net's training logs;
    the epoch count from the ``debug.json`` nnU-Net writes when a training starts."""
    progress = TrainingProgress()
    if not folder.is_dir():
        return progress
    try:
        progress.num_epochs = int(json.loads((folder / "debug.json").read_text(encoding="utf-8"))["num_epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for log in sorted(folder.glob("training_log_*.txt")):
        progress.logs += 1
        current, first = None, None
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if m := _EPOCH.search(line):
                current = int(m.group(1))
                first = current if first is None else first
            elif _EPOCH_TIME.search(line) and current is not None:
                progress.epochs_done = max(progress.epochs_done, current + 1)
            elif m := _BEST_EMA.search(line):
                value = float(m.group(1))
                if progress.best_ema_dice is None or value > progress.best_ema_dice:
                    progress.best_ema_dice = value
            elif m := _VAL_DICE.search(line):
                progress.validation_dice = float(m.group(1))
        if first is not None:
            progress.first_epoch_of_last_log = first
    return progress
