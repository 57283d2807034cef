"""``l1dfl experiment submit --slurm`` on a real one-node SLURM cluster (munged + slurmctld + slurmd,
started by the ``slurm_cluster`` fixture of tests/_slurm.py; skipped with the reason when the
slurm-wlm / munge packages are not installed).

A tiny experiment (toy dataset, 2 trainers x 2 folds of 3 epochs, CPU) goes through SLURM: the
preprocessing job, the training array (afterok) and collect (afterok). One training is cancelled
with ``scancel`` once it has a checkpoint; ``status`` reports it with its log tail, the others
finish, collect stays blocked. A re-submit starts only that training, which continues with ``--c``
from its checkpoint, and a new collect that writes the comparison report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _experiment_helpers import (
    DATASET_ID,
    TRAINERS,
    l1dfl,
    nnunet_folders,
    quiet_nnunet_env,
    wait_for,
    write_toy_dataset,
    write_trainers,
)
from _slurm import slurm_cluster  # noqa: F401 - the fixture

from nnunetv2_l1dfl.experiment.config import Experiment, save
from nnunetv2_l1dfl.experiment.jobs import fold_folder, train_jobs, training_done, training_progress
from nnunetv2_l1dfl.experiment.slurm import ACTIVE_STATES, load_submissions

DATASET = "Dataset917_XpToy"


def _queue(cluster) -> dict[str, str]:
    out = cluster.run("squeue", "-h", "-r", "-o", "%i|%T|%r").stdout
    return {line.split("|")[0]: line.split("|", 1)[1] for line in out.splitlines() if "|" in line}


def _complete_checkpoint(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError):  # absent, or still being written
        return False
    return True


@pytest.mark.slow
def test_submit_cancel_resubmit_collect(slurm_cluster, tmp_path):  # noqa: F811 - pytest fixture
    folders = nnunet_folders(tmp_path)
    write_toy_dataset(folders["nnUNet_raw"])
    write_trainers(tmp_path / "trainers", epochs=3)
    experiment = Experiment(path=tmp_path / "xp.toml", dataset=DATASET_ID, trainers=list(TRAINERS), folds=[0, 1],
                            device="cpu", nnunet_raw=folders["nnUNet_raw"],
                            nnunet_preprocessed=folders["nnUNet_preprocessed"], nnunet_results=folders["nnUNet_results"],
                            trainer_folders=[tmp_path / "trainers"], preprocess_processes=1, ensembling=False,
                            compare_args=["-np", "1", "--no-plots"])
    experiment.slurm.cpus_per_task = 1
    experiment.slurm.time = "30:00"
    save(experiment)
    env = {**quiet_nnunet_env(), "SLURM_CONF": str(slurm_cluster.conf)}
    toml = str(experiment.path)

    out = l1dfl("experiment", "submit", toml, "--slurm", "--allow-local-paths", env=env).stdout
    assert "4 training(s) as array" in out, out
    first = load_submissions(experiment)[0]["jobs"]
    jobs = train_jobs(experiment)
    assert set(first) == {"preprocess", "collect", *(j.key for j in jobs)}
    array_id = first[jobs[0].key].split("_")[0]
    assert [first[j.key] for j in jobs] == [f"{array_id}_{i}" for i in range(4)]
    scripts = experiment.folder / "slurm"
    assert {p.name for p in scripts.glob("*.sbatch")} == {"preprocess.sbatch", "train.sbatch", "collect.sbatch"}

    # Cancel the first training once it has a checkpoint to continue from.
    victim = jobs[0]
    victim_folder = fold_folder(experiment, victim, DATASET)
    # A complete checkpoint: the file appears when nnU-Net's torch.save opens it, and a cancel during
    # the write leaves a truncated file (see docs/experiment.md, "Known limits").
    wait_for(lambda: _complete_checkpoint(victim_folder / "checkpoint_latest.pth"), 900,
             "a complete checkpoint of the first training", interval=0.3)
    assert not training_done(victim_folder), "the training finished before it could be cancelled"
    slurm_cluster.run("scancel", first[victim.key])
    others = [j for j in jobs if j != victim]

    def others_finished() -> bool:
        queue = _queue(slurm_cluster)
        return all(first[j.key] not in queue for j in others) and first[victim.key] not in queue

    wait_for(others_finished, 1200, "the other trainings to leave the queue", interval=2)
    assert all(training_done(fold_folder(experiment, j, DATASET)) for j in others), slurm_cluster.logs()
    assert not training_done(victim_folder)
    import torch

    resume_epoch = torch.load(victim_folder / "checkpoint_latest.pth", map_location="cpu",
                              weights_only=False)["current_epoch"]
    assert 1 <= resume_epoch < 3
    finals = {j.key: (fold_folder(experiment, j, DATASET) / "checkpoint_final.pth").stat().st_mtime for j in others}
    wait_for(lambda: "DependencyNeverSatisfied" in _queue(slurm_cluster).get(first["collect"], ""), 120,
             "collect to be blocked by the cancelled training")

    status = l1dfl("experiment", "status", toml, env=env).stdout
    rows = {line.split("  ")[0]: line for line in status.splitlines()}
    assert "cancelled (slurm CANCELLED)" in rows[victim.label] and first[victim.key] in rows[victim.label], status
    assert all(rows[j.label].split()[4] == "done" and "3/3" in rows[j.label] for j in others), status
    assert "blocked" in rows["collect"] and f"--- {victim.label}: last lines of its log" in status
    assert "3/4 trainings done" in status

    # Re-submit: only the cancelled training (continued with --c) and a new collect.
    out = l1dfl("experiment", "submit", toml, "--slurm", "--allow-local-paths", env=env).stdout
    second = load_submissions(experiment)[1]["jobs"]
    assert set(second) == {victim.key, "collect"}, out
    assert second[victim.key].endswith("_0") and second[victim.key] != first[victim.key]
    wait_for(lambda: first["collect"] not in _queue(slurm_cluster), 60, "the blocked collect to be cancelled")
    wait_for(lambda: not any(state.split("|")[0] in ACTIVE_STATES for state in _queue(slurm_cluster).values()),
             1200, "the re-submitted jobs to finish", interval=2)

    assert training_done(victim_folder), (experiment.folder / "logs" / f"{victim.key}.log").read_text()[-3000:]
    progress = training_progress(victim_folder)
    assert progress.logs == 2 and progress.first_epoch_of_last_log == resume_epoch, "not continued with --c"
    for j in others:
        assert (fold_folder(experiment, j, DATASET) / "checkpoint_final.pth").stat().st_mtime == finals[j.key]
        assert len(list(fold_folder(experiment, j, DATASET).glob("training_log_*.txt"))) == 1, "a training was redone"
    log = (experiment.folder / "logs" / f"{victim.key}.log").read_text()
    assert log.count("==== ") == 2 and log.count("--c") >= 2
    events = (experiment.folder / "jobs" / f"{victim.key}.events").read_text()
    assert "SIGNAL TERM" in events and events.strip().splitlines()[-1].split(" ", 1)[1].startswith("END rc=0")

    report = experiment.folder / "report"
    summary = json.loads((report / "3d_fullres" / "summary.json").read_text())
    assert summary["trainers"] == list(TRAINERS), (experiment.folder / "logs" / "collect.log").read_text()[-3000:]
    assert (report / "3d_fullres" / "report.md").is_file() and (report / "collect.done").is_file()
    best = json.loads((report / "find_best" / "inference_information.json").read_text())
    assert best["best_model_or_ensemble"]

    status = l1dfl("experiment", "status", toml, env=env).stdout
    assert "4/4 trainings done, 0 failed" in status and "collect done" in status, status
    out = l1dfl("experiment", "submit", toml, "--slurm", "--allow-local-paths", env=env).stdout
    assert "nothing to submit" in out and len(load_submissions(experiment)) == 2
    assert os.environ.get("SLURM_CONF") == str(slurm_cluster.conf)
