"""SLURM: sbatch scripts in the experiment folder, submission with dependencies, job states.

Scripts (``<experiment>/slurm/{preprocess,train,collect}.sbatch``) are plain bash, readable and
re-submittable by hand (``sbatch <experiment>/slurm/train.sbatch`` runs every training whose fold
is not finished; finished ones exit at once). Each sets the nnU-Net variables itself, takes the
job's lock, appends START/END lines to ``<experiment>/jobs/<key>.events`` and writes its output to
``<experiment>/logs/<key>.log``. Trainings run with ``--requeue`` and nnU-Net's ``--c``: a
preempted, requeued or re-submitted training continues from its latest checkpoint; with
``requeue_on_timeout`` a job near its time limit requeues itself (``--signal=B:USR1@300``).

Submissions are recorded in ``<experiment>/slurm/submissions.json``; states come from ``squeue``
and ``scontrol`` (no accounting database needed), then from the job files.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from nnunetv2_l1dfl.experiment.config import Experiment, ExperimentError
from nnunetv2_l1dfl.experiment.jobs import (
    COLLECT,
    PREPROCESS,
    TrainJob,
    check,
    collect_commands,
    collect_done,
    fold_folder,
    job_environment,
    preprocess_command,
    preprocess_missing,
    report_folder,
    train_command,
    train_jobs,
    training_done,
)

#: squeue states of a job that will still run (or runs now): never start it again.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED"}
#: Folders that are local to one machine: a job on another node would not see them.
LOCAL_ONLY_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/scratch/local")


def slurm_folder(experiment: Experiment) -> Path:
    return experiment.folder / "slurm"


def _bash(parts: list[str], variables: dict[str, str] | None = None) -> str:
    """Quote a command for bash; ``variables`` maps literal values to ``"$NAME"`` references."""
    variables = variables or {}
    return " ".join(f'"${variables[p]}"' if p in variables else shlex.quote(p) for p in parts)


def _header(experiment: Experiment, name: str, *, cpus: int, gres: bool, requeue: bool,
            array: str | None = None) -> list[str]:
    s = experiment.slurm
    lines = ["#!/bin/bash",
             f"# l1dfl experiment {experiment.name}: {name} job, written by 'l1dfl experiment submit'.",
             f"# Re-submit by hand: sbatch {slurm_folder(experiment) / (name + '.sbatch')}"
             + ("  (finished trainings exit at once)" if array else ""),
             f"#SBATCH --job-name=l1dfl-{experiment.name}-{name}",
             f"#SBATCH --output={experiment.folder / 'logs' / 'slurm' / (name + ('_%A_%a' if array else '_%j') + '.out')}",
             "#SBATCH --open-mode=append",
             "#SBATCH --nodes=1",
             f"#SBATCH --cpus-per-task={cpus}"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    if s.time:
        lines.append(f"#SBATCH --time={s.time}")
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    if s.mem:
        lines.append(f"#SBATCH --mem={s.mem}")
    if gres and s.gres:
        lines.append(f"#SBATCH --gres={s.gres}")
    if requeue:
        lines.append("#SBATCH --requeue")
        if s.requeue_on_timeout and s.time:
            lines.append("#SBATCH --signal=B:USR1@300")
    lines += [f"#SBATCH {arg}" for arg in s.sbatch_args]
    return lines


def _preamble(experiment: Experiment) -> list[str]:
    lines = ["", "set -uo pipefail", "# nnU-Net's folders and trainer lookup (the user's trainer folders first, then "
             "nnunetv2-l1dfl's)"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job_environment(experiment).items()]
    lines += [f"EXP={shlex.quote(str(experiment.folder))}",
              'mkdir -p "$EXP/locks" "$EXP/jobs" "$EXP/logs"']
    return lines


_RUN_JOB = r'''
event() { echo "$(date +%Y-%m-%dT%H:%M:%S) $*" >> "$EXP/jobs/$KEY.events"; }
run_job() {  # run "$@" holding the job's lock; START/END lines in the job's events file
    exec 9>>"$EXP/locks/$KEY.lock"
    if ! flock -n 9; then
        echo "l1dfl: $KEY is already running ($(cat "$EXP/locks/$KEY.lock")); not started again" >&2
        exit 1
    fi
    echo "slurm=$JOBID host=$(hostname) pid=$$" > "$EXP/locks/$KEY.lock"
    exec >> "$EXP/logs/$KEY.log" 2>&1
    echo "==== $(date '+%Y-%m-%d %H:%M:%S') slurm job $JOBID on $(hostname)"
    echo "\$ $*"
    event "START slurm=$JOBID host=$(hostname)"
    "$@" &
    CHILD=$!
    trap 'event "SIGNAL TERM slurm=$JOBID"; kill -TERM $CHILD 2>/dev/null' TERM
    trap 'event "REQUEUE time limit near slurm=$JOBID"; scontrol requeue "$SLURM_JOB_ID"' USR1
    while true; do
        wait $CHILD
        rc=$?
        kill -0 $CHILD 2>/dev/null || break  # wait returned for a trapped signal: the child still runs
    done
    event "END rc=$rc slurm=$JOBID"
    return $rc
}
'''


def write_scripts(experiment: Experiment, dataset: str) -> dict[str, Path]:
    """Write the three sbatch scripts; returns name -> path."""
    folder = slurm_folder(experiment)
    folder.mkdir(parents=True, exist_ok=True)
    (experiment.folder / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    s = experiment.slurm
    scripts = {}

    missing = preprocess_missing(experiment, dataset) or ["plans", *experiment.configurations]
    pre = _header(experiment, PREPROCESS, cpus=max(s.cpus_per_task, experiment.preprocess_processes), gres=False,
                  requeue=False)
    pre += _preamble(experiment) + ["KEY=preprocess", 'JOBID="$SLURM_JOB_ID"', _RUN_JOB,
                                    "run_job " + _bash(preprocess_command(experiment, missing))]
    scripts[PREPROCESS] = pre

    jobs = train_jobs(experiment)
    tasks = ["TASKS=(  # trainer configuration fold; the array index is the position"]
    tasks += [f"    {shlex.quote(f'{j.trainer} {j.configuration} {j.fold}')}  # {i}" for i, j in enumerate(jobs)]
    tasks.append(")")
    probe = TrainJob("__TRAINER__", "__CONFIG__", 0)
    fold_dir = str(fold_folder(experiment, probe, dataset)).replace("__TRAINER__", "${TRAINER}").replace(
        "__CONFIG__", "${CONFIG}").replace("fold_0", "fold_${FOLD}")
    command = train_command(experiment, probe)
    command[command.index("__CONFIG__") + 1] = "__FOLD__"
    train = _header(experiment, "train", cpus=s.cpus_per_task, gres=experiment.device == "cuda", requeue=True,
                    array=f"0-{len(jobs) - 1}")
    train += _preamble(experiment) + tasks + [
        'read -r TRAINER CONFIG FOLD <<< "${TASKS[$SLURM_ARRAY_TASK_ID]}"',
        'KEY="${TRAINER}__${CONFIG}__fold${FOLD}"',
        'JOBID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        f'FOLD_DIR="{fold_dir}"',
        'if [[ -f "$FOLD_DIR/checkpoint_final.pth" && -f "$FOLD_DIR/validation/summary.json" ]]; then',
        '    echo "l1dfl: $KEY is finished ($FOLD_DIR); nothing to do"',
        "    exit 0",
        "fi",
        _RUN_JOB,
        "run_job " + _bash(command, {"__TRAINER__": "TRAINER", "__CONFIG__": "CONFIG", "__FOLD__": "FOLD"}),
    ]
    scripts["train"] = train

    report = report_folder(experiment)
    collect = _header(experiment, COLLECT, cpus=max(1, min(s.cpus_per_task, 8)), gres=False, requeue=False)
    collect += _preamble(experiment) + ["KEY=collect", 'JOBID="$SLURM_JOB_ID"', _RUN_JOB,
                                        "collect() {", "    set -e", f'    mkdir -p {shlex.quote(str(report))}']
    results = experiment.nnunet_paths()["nnUNet_results"] / dataset
    for cmd in collect_commands(experiment):
        collect.append("    " + _bash(cmd))
        if any("find_best_configuration" in part for part in cmd[:3]):
            collect.append(f"    mkdir -p {shlex.quote(str(report / 'find_best'))}")
            collect.append(f"    cp {shlex.quote(str(results))}/inference_information.json "
                           f"{shlex.quote(str(results))}/inference_instructions.txt "
                           f"{shlex.quote(str(report / 'find_best'))}/")
    collect += [f"    touch {shlex.quote(str(report / 'collect.done'))}", "}", "run_job collect"]
    scripts[COLLECT] = collect

    paths = {}
    for name, lines in scripts.items():
        path = folder / f"{name}.sbatch"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        path.chmod(0o755)
        paths[name] = path
    return paths


# --------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ExperimentError(f"{cmd[0]} not found on PATH: SLURM's client commands are needed") from e
    except subprocess.TimeoutExpired as e:
        raise ExperimentError(f"{cmd[0]} did not answer within {timeout:.0f} s") from e


def squeue_states() -> dict[str, str]:
    """Job ID (``123`` or ``123_4`` for array tasks) -> state, for the user's jobs in the queue.

    A pending job whose dependency can never be met (a training it waits for failed or was
    cancelled) is reported as ``NEVER`` (SLURM keeps it pending forever).
    """
    result = _run(["squeue", "-h", "-r", "-u", str(os.getuid()), "-o", "%i|%T|%r"])
    if result.returncode != 0:
        raise ExperimentError(f"squeue failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    states = {}
    for line in result.stdout.splitlines():
        if "|" in line:
            job, state, reason = (line.strip().split("|") + ["", ""])[:3]
            states[job] = "NEVER" if state == "PENDING" and reason == "DependencyNeverSatisfied" else state
    return states


def scontrol_state(job_id: str) -> str | None:
    """State of a job that has left the queue, while slurmctld still remembers it (MinJobAge), else None."""
    if shutil.which("scontrol") is None:
        return None
    result = _run(["scontrol", "show", "job", "-o", job_id], timeout=30)
    if result.returncode != 0:
        return None
    for line in result.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        task = fields.get("ArrayTaskId")
        if "_" in job_id and task is not None and task != job_id.split("_", 1)[1]:
            continue
        if "JobState" in fields:
            return fields["JobState"]
    return None


def load_submissions(experiment: Experiment) -> list[dict]:
    path = slurm_folder(experiment) / "submissions.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def latest_slurm_ids(experiment: Experiment) -> dict[str, str]:
    """Job key -> the SLURM job ID of its latest submission."""
    ids: dict[str, str] = {}
    for record in load_submissions(experiment):
        for key, job_id in record.get("jobs", {}).items():
            ids[key] = job_id
    return ids


def slurm_states(experiment: Experiment) -> dict[str, tuple[str, str]]:
    """Job key -> (SLURM job ID, state) for every job ever submitted; state from squeue, then scontrol."""
    ids = latest_slurm_ids(experiment)
    if not ids:
        return {}
    if shutil.which("squeue") is None:
        return {key: (job_id, "UNKNOWN (no squeue here)") for key, job_id in ids.items()}
    queue = squeue_states()
    states = {}
    for key, job_id in ids.items():
        state = queue.get(job_id)
        if state is None and "_" in job_id:  # a pending array may still be listed under its array ID
            state = queue.get(job_id.split("_", 1)[0] + "_[" + job_id.split("_", 1)[1] + "]")
        if state is None:
            state = scontrol_state(job_id) or "GONE"
        states[key] = (job_id, state)
    return states


def active_slurm_jobs(experiment: Experiment) -> dict[str, str]:
    """Job key -> SLURM job ID for the experiment's jobs that are pending or running now."""
    return {key: job_id for key, (job_id, state) in slurm_states(experiment).items() if state in ACTIVE_STATES}


# --------------------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------------------
def local_only_paths(experiment: Experiment) -> list[str]:
    """Experiment paths under machine-local folders (/tmp and the like), which other nodes do not see."""
    candidates = {"experiment folder": experiment.folder, **experiment.nnunet_paths()}
    for i, folder in enumerate(experiment.trainer_folders):
        candidates[f"trainer_folders[{i}]"] = folder
    prefixes = list(LOCAL_ONLY_PREFIXES)
    if os.environ.get("TMPDIR"):
        prefixes.append(os.environ["TMPDIR"].rstrip("/"))
    bad = []
    for label, path in candidates.items():
        real = os.path.realpath(path)
        if any(real == p or real.startswith(p.rstrip("/") + "/") for p in prefixes):
            bad.append(f"{label} {real}")
    return bad


def _sbatch(args: list[str]) -> str:
    result = _run(["sbatch", "--parsable", *args])
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise ExperimentError(f"sbatch {' '.join(args)} failed: {message[-1] if message else result.returncode}")
    return result.stdout.strip().split(";")[0]


def submit(experiment: Experiment) -> dict:
    """Submit what is not finished and not queued; returns the submission record (empty 'jobs' when nothing)."""
    if shutil.which("sbatch") is None:
        raise ExperimentError("sbatch not found on PATH: 'submit --slurm' needs SLURM's client commands "
                              "(run it on a login node of the cluster, or use 'l1dfl experiment run')")
    if not experiment.slurm.allow_local_paths:
        bad = local_only_paths(experiment)
        if bad:
            raise ExperimentError(f"{experiment.path}: machine-local path(s) {'; '.join(bad)}: cluster jobs need "
                                  "folders every node sees (a shared file system); for a single-node cluster pass "
                                  "--allow-local-paths")
    dataset = check(experiment)
    never = [job_id for job_id, state in slurm_states(experiment).values() if state == "NEVER"]
    if never:  # pending on a failed or cancelled job: they would wait forever; the new submission replaces them
        _run(["scancel", *never])
    active = active_slurm_jobs(experiment)
    scripts = write_scripts(experiment, dataset)

    jobs = train_jobs(experiment)
    submitted: dict[str, str] = {}
    pre_dependency = None
    if preprocess_missing(experiment, dataset):
        if PREPROCESS in active:
            pre_dependency = active[PREPROCESS]
        else:
            pre_dependency = submitted[PREPROCESS] = _sbatch([str(scripts[PREPROCESS])])
    todo = [i for i, job in enumerate(jobs)
            if job.key not in active and not training_done(fold_folder(experiment, job, dataset))]
    train_dependencies = [active[j.key] for j in jobs if j.key in active]
    if todo:
        args = [f"--array={','.join(map(str, todo))}"]
        if pre_dependency:
            args.append(f"--dependency=afterok:{pre_dependency}")
        array_id = _sbatch(args + [str(scripts["train"])])
        for i in todo:
            submitted[jobs[i].key] = f"{array_id}_{i}"
        train_dependencies.append(array_id)
    if COLLECT not in active and (todo or train_dependencies or not collect_done(experiment, dataset)):
        deps = train_dependencies + ([pre_dependency] if pre_dependency and not todo else [])
        args = [f"--dependency=afterok:{':'.join(deps)}"] if deps else []
        submitted[COLLECT] = _sbatch(args + [str(scripts[COLLECT])])
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": submitted,
              "waiting_on": {k: v for k, v in active.items()}}
    if submitted:
        records = load_submissions(experiment) + [record]
        path = slurm_folder(experiment) / "submissions.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
        tmp.replace(path)
    return record
