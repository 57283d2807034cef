"""``l1dfl experiment {init,plan,run,submit,status,collect}``: the comparison as one declared experiment."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PAPER_TRAINERS = ["nnUNetTrainer", "nnUNetTrainerSquaredDice", "nnUNetTrainerDiceFocal", "nnUNetTrainerL1DFL"]

_DESCRIPTION = """\
Declare the trainer comparison once (EXPERIMENT.toml: dataset, configurations, trainers, folds,
device, nnU-Net folders, scheduler options) and run its job graph: preprocess (skipped when done)
-> one nnUNetv2_train per trainer x configuration x fold -> collect (nnUNetv2_find_best_configuration
and l1dfl compare). Re-running 'run' or 'submit' starts only what is not finished, continues
interrupted trainings with --c and never starts a job that is running. Scripts, logs and the report
go into the folder named like the file, beside it. See docs/experiment.md.
"""


def _fail(command: str, message: str) -> int:
    print(f"l1dfl experiment {command}: error: {message}", file=sys.stderr)
    return 2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="the trainer comparison as one experiment: init, plan, run "
                                   "locally or submit to SLURM, status, collect", description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("init", help="write EXPERIMENT.toml (checks trainers, folds and the dataset first)")
    p.add_argument("toml", type=Path, help="experiment file to write, e.g. paper.toml")
    p.add_argument("-d", "--dataset", type=int, required=True, help="nnU-Net dataset ID")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"], help="configurations (default: 3d_fullres)")
    p.add_argument("-tr", "--trainers", nargs="+", default=PAPER_TRAINERS,
                   help=f"trainers; the first is the comparison's reference (default: {' '.join(PAPER_TRAINERS)})")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default: 0 1 2 3 4)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="training device (default: cuda)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="GPUs per training (nnU-Net -num_gpus: DDP on one node; default: 1)")
    p.add_argument("--no-npz", dest="npz", action="store_false",
                   help="no --npz (no probabilities: no calibration in the report, no ensembling)")
    p.add_argument("--trainer-folder", action="append", type=Path, default=[],
                   help="a folder with your own trainers (nnUNet_extTrainer entry); repeat for several")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        p.add_argument(f"--{name.split('_', 1)[1]}", dest=name, type=Path, default=None,
                       help=f"{name} folder (default: ${name})")
    p.add_argument("--no-preprocess", dest="preprocess", action="store_false",
                   help="the dataset must already be preprocessed (no preprocessing job)")
    p.add_argument("-np", type=int, default=4, help="processes for preprocessing and find_best (default: 4)")
    p.add_argument("--force", action="store_true", help="overwrite an existing experiment file")
    p.set_defaults(func=init_entry)

    for name, help_text in (("plan", "show the job graph: what is done, what is left, the commands"),
                            ("status", "per job: state, epoch / total, best EMA Dice, log tail on failure"),
                            ("collect", "find_best_configuration + l1dfl compare now (every training finished)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("toml", type=Path)
        p.set_defaults(func={"plan": plan_entry, "status": status_entry, "collect": collect_entry}[name])

    p = sub.add_parser("run", help="run the job graph on this machine (one training per GPU, serial on CPU)")
    p.add_argument("toml", type=Path)
    p.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1,2,3 (default: $CUDA_VISIBLE_DEVICES, else 0)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="override the file's device (recorded in the file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_entry)

    p = sub.add_parser("submit", help="write sbatch scripts and submit preprocess -> array of trainings -> collect")
    p.add_argument("toml", type=Path)
    p.add_argument("--slurm", action="store_true", help="submit to SLURM (the only scheduler so far)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=None, help="time limit per job, e.g. 48:00:00")
    p.add_argument("--gres", default=None, help="GPUs per training job, e.g. gpu:1 (with num_gpus N: gpu:N)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem", default=None, help="memory per job, e.g. 64G")
    p.add_argument("--sbatch-arg", action="append", default=None, metavar="ARG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--qos=long (repeatable; replaces the file's list)")
    p.add_argument("--allow-local-paths", action="store_true", default=None,
                   help="accept /tmp-like machine-local paths (single-node clusters only)")
    p.set_defaults(func=submit_entry)


def _load(command: str, path: Path):
    from nnunetv2_l1dfl.experiment.config import load

    return load(path)


def init_entry(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.experiment.config import Experiment, ExperimentError, save
    from nnunetv2_l1dfl.experiment.jobs import check, train_jobs

    path = args.toml.absolute()
    if path.suffix != ".toml":
        return _fail("init", f"{path}: the experiment file must end in .toml")
    if path.exists() and not args.force:
        return _fail("init", f"{path} exists (edit it, or pass --force to overwrite)")
    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = getattr(args, name) or (Path(os.environ[name]) if os.environ.get(name) else None)
        paths[name] = value.absolute() if value is not None else None
    experiment = Experiment(path=path, dataset=args.dataset, trainers=list(args.trainers),
                            configurations=list(args.configurations), plans=args.plans, folds=list(args.folds),
                            device=args.device, npz=args.npz, num_gpus=args.num_gpus,
                            nnunet_raw=paths["nnUNet_raw"], nnunet_preprocessed=paths["nnUNet_preprocessed"],
                            nnunet_results=paths["nnUNet_results"],
                            trainer_folders=[p.absolute() for p in args.trainer_folder],
                            preprocess_allowed=args.preprocess, preprocess_processes=args.np)
    try:
        experiment.validate()
        dataset = check(experiment)
    except ExperimentError as e:
        return _fail("init", str(e))
    save(experiment)
    print(f"l1dfl experiment init: {path}: {dataset}, {len(train_jobs(experiment))} trainings "
          f"({len(experiment.trainers)} trainers x {len(experiment.configurations)} configurations x "
          f"{len(experiment.folds)} folds), device {experiment.device}; next: l1dfl experiment plan {args.toml}")
    return 0


def plan_entry(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.experiment.config import ExperimentError
    from nnunetv2_l1dfl.experiment.jobs import (
        check,
        collect_commands,
        collect_done,
        fold_folder,
        preprocess_command,
        preprocess_missing,
        train_command,
        train_jobs,
        training_done,
    )

    try:
        experiment = _load("plan", args.toml)
        dataset = check(experiment, resolve=False)  # trainers are looked up by init, run and submit
    except ExperimentError as e:
        return _fail("plan", str(e))
    missing = preprocess_missing(experiment, dataset)
    print(f"experiment {experiment.name} ({experiment.path}), dataset {dataset}, folder {experiment.folder}")
    print(f"[{'todo' if missing else 'done'}] preprocess" + (f" ({', '.join(missing)} missing)" if missing else ""))
    if missing:
        print("    $ " + " ".join(preprocess_command(experiment, missing)))
    left = 0
    for job in train_jobs(experiment):
        done = training_done(fold_folder(experiment, job, dataset))
        left += not done
        print(f"[{'done' if done else 'todo'}] train {job.label}")
        if not done:
            print("    $ " + " ".join(train_command(experiment, job)))
    cdone = left == 0 and collect_done(experiment, dataset)
    print(f"[{'done' if cdone else 'todo'}] collect (after every training)")
    for cmd in collect_commands(experiment):
        print("    $ " + " ".join(cmd))
    total = len(train_jobs(experiment))
    print(f"l1dfl experiment plan: {total - left}/{total} trainings done, preprocess "
          f"{'todo' if missing else 'done'}, collect {'done' if cdone else 'todo'}")
    return 0


def run_entry(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.experiment.config import ExperimentError, save
    from nnunetv2_l1dfl.experiment.local import RunInterrupted, run_local

    start = time.perf_counter()
    try:
        experiment = _load("run", args.toml)
        if args.device is not None and args.device != experiment.device:
            experiment.device = args.device
            experiment.validate()
            save(experiment)
        outcome = run_local(experiment, gpus=args.gpus, progress=not args.no_progress)
    except ExperimentError as e:
        return _fail("run", str(e))
    except (RunInterrupted, KeyboardInterrupt):
        print(f"l1dfl experiment run: interrupted; running jobs were stopped. Run the same command again to "
              f"continue (interrupted trainings continue with --c): l1dfl experiment run {args.toml}",
              file=sys.stderr)
        return 130
    failed, skipped = outcome["failed"], outcome["skipped"]
    for key, log in failed.items():
        print(f"l1dfl experiment run: {key} failed; read {log}", file=sys.stderr)
    print(f"l1dfl experiment run: {len(outcome['done'])} job(s) finished, {len(failed)} failed, "
          f"{len(skipped)} not started{' (' + '; '.join(f'{k}: {v}' for k, v in skipped.items()) + ')' if skipped else ''}"
          f" in {(time.perf_counter() - start) / 60:.1f} min; l1dfl experiment status {args.toml}")
    return 1 if failed else 0


def submit_entry(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.experiment.config import ExperimentError, save
    from nnunetv2_l1dfl.experiment.slurm import slurm_folder, submit

    if not args.slurm:
        return _fail("submit", "give --slurm (SLURM is the scheduler supported; 'run' uses this machine)")
    try:
        experiment = _load("submit", args.toml)
        s = experiment.slurm
        for name in ("partition", "account", "time", "gres", "cpus_per_task", "mem", "allow_local_paths"):
            value = getattr(args, name)
            if value is not None:
                setattr(s, name, value)
        if args.sbatch_arg is not None:
            s.sbatch_args = list(args.sbatch_arg)
        experiment.validate()
        record = submit(experiment)
    except ExperimentError as e:
        return _fail("submit", str(e))
    save(experiment)  # the file records the scheduler options used
    jobs = record["jobs"]
    if not jobs:
        print(f"l1dfl experiment submit: nothing to submit (every job is finished or queued: "
              f"{', '.join(record['waiting_on']) or 'all done'})")
        return 0
    trainings = [k for k in jobs if k not in ("preprocess", "collect")]
    array = jobs[trainings[0]].split("_")[0] if trainings else "-"
    print(f"l1dfl experiment submit: preprocess {jobs.get('preprocess', 'not needed')}, "
          f"{len(trainings)} training(s) as array {array}, collect {jobs.get('collect', '-')}; scripts in "
          f"{slurm_folder(experiment)}; l1dfl experiment status {args.toml}")
    return 0


def status_entry(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.experiment.config import ExperimentError
    from nnunetv2_l1dfl.experiment.status import experiment_status, format_table

    try:
        experiment = _load("status", args.toml)
        rows = experiment_status(experiment)
    except ExperimentError as e:
        return _fail("status", str(e))
    print(format_table(rows))
    trainings = rows[1:-1]
    done = sum(r.state == "done" for r in trainings)
    failed = sum(r.failed for r in rows)
    print(f"l1dfl experiment status: {done}/{len(trainings)} trainings done, {failed} failed or interrupted, "
          f"collect {rows[-1].state}")
    return 0


def collect_entry(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.experiment.config import ExperimentError
    from nnunetv2_l1dfl.experiment.local import RunInterrupted, run_collect

    try:
        experiment = _load("collect", args.toml)
        report = run_collect(experiment)
    except ExperimentError as e:
        return _fail("collect", str(e))
    except RunInterrupted:
        return _fail("collect", "interrupted")
    print(f"l1dfl experiment collect: report in {report}")
    return 0
