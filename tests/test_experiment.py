"""``l1dfl experiment``: the TOML record, the checks made before anything starts, the job scripts,
and a local ``run`` of a tiny experiment (2 trainers x 2 folds on CPU) interrupted and re-run.

The SLURM path runs on a real local cluster in test_experiment_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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

from nnunetv2_l1dfl.cli import main as l1dfl_main
from nnunetv2_l1dfl.experiment.config import Experiment, ExperimentError, load, save
from nnunetv2_l1dfl.experiment.jobs import (
    check,
    fold_folder,
    train_jobs,
    training_done,
    training_progress,
)


def _experiment(tmp_path: Path, **overrides) -> Experiment:
    folders = nnunet_folders(tmp_path)
    values = dict(path=tmp_path / "xp.toml", dataset=DATASET_ID, trainers=list(TRAINERS), folds=[0, 1], device="cpu",
                  nnunet_raw=folders["nnUNet_raw"], nnunet_preprocessed=folders["nnUNet_preprocessed"],
                  nnunet_results=folders["nnUNet_results"], trainer_folders=[tmp_path / "trainers"],
                  preprocess_processes=1, compare_args=["-np", "1", "--no-plots"])
    values.update(overrides)
    return Experiment(**values)


def test_toml_round_trip_and_bad_values(tmp_path):
    experiment = _experiment(tmp_path, num_gpus=1, npz=False)
    experiment.slurm.sbatch_args = ["--qos=long"]
    save(experiment)
    text = experiment.path.read_text()
    assert text.startswith("# l1dfl experiment") and "[slurm]" in text
    again = load(experiment.path)
    assert again.to_toml() == experiment.to_toml() and again.folder == tmp_path / "xp"

    def broken(old: str, new: str) -> str:
        experiment.path.write_text(text.replace(old, new, 1))
        with pytest.raises(ExperimentError) as info:
            load(experiment.path)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "unknown key 'foldz'" in broken("folds = [", "foldz = [")
    assert "[experiment] dataset must be a int" in broken(f"dataset = {DATASET_ID}", 'dataset = "917"')
    assert "device must be one of" in broken('device = "cpu"', 'device = "tpu"')
    assert "3d_cascade_fullres needs 3d_lowres" in broken('"3d_fullres"', '"3d_cascade_fullres"')
    assert "not valid TOML" in broken("[slurm]", "[slurm")
    assert "num_gpus 2 needs device 'cuda'" in broken("num_gpus = 1", "num_gpus = 2")


def _fake_sbatch(tmp_path: Path) -> tuple[dict, Path]:
    """PATH with an sbatch that records every call: 'nothing submitted' is checked on it."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    for name in ("sbatch", "squeue", "scontrol", "scancel"):
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {calls}\necho 1\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def test_bad_inputs_fail_in_one_line_and_submit_nothing(tmp_path, monkeypatch, capsys):
    experiment = _experiment(tmp_path, preprocess_allowed=False)
    write_toy_dataset(experiment.nnunet_raw)
    write_trainers(tmp_path / "trainers", epochs=1)
    save(experiment)
    path_env, calls = _fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", path_env["PATH"])

    def submit_error() -> str:
        code = l1dfl_main(["experiment", "submit", str(experiment.path), "--slurm", "--allow-local-paths"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert not calls.exists(), "something was submitted"
        assert not (experiment.folder / "slurm" / "submissions.json").exists()
        return err

    # Not preprocessed, preprocessing not allowed.
    assert "is not preprocessed (plans, 3d_fullres missing) and [preprocess] allowed = false" in submit_error()
    # A fold outside splits_final.json (2 folds here); nnU-Net would silently train a random split.
    experiment.preprocess_allowed = True
    save(experiment)
    splits = experiment.nnunet_preprocessed / "Dataset917_XpToy" / "splits_final.json"
    splits.parent.mkdir(parents=True)
    splits.write_text(json.dumps([{"train": ["a"], "val": ["b"]}] * 2))
    experiment.folds = [0, 3]
    save(experiment)
    assert "fold(s) [3] outside the 2 folds of" in submit_error()
    splits.unlink()
    # An unknown trainer, resolved through nnU-Net's lookup (user folder, then ours).
    experiment.folds = [0, 1]
    experiment.trainers = [TRAINERS[0], "nnUNetTrainerNoSuchLoss"]
    save(experiment)
    err = submit_error()
    assert "trainer(s) nnUNetTrainerNoSuchLoss not found by nnU-Net's lookup" in err and str(tmp_path / "trainers") in err
    # Machine-local paths are refused for a cluster unless the single-node override is given.
    experiment.trainers = list(TRAINERS)
    save(experiment)
    assert l1dfl_main(["experiment", "submit", str(experiment.path), "--slurm"]) == 2
    err = capsys.readouterr().err
    assert "machine-local path(s)" in err and "--allow-local-paths" in err and not calls.exists()
    # sbatch missing.
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert "sbatch not found on PATH" in submit_error()
    # init refuses the unknown trainer too, and writes no file.
    monkeypatch.setenv("PATH", path_env["PATH"])
    new = tmp_path / "other.toml"
    code = l1dfl_main(["experiment", "init", str(new), "-d", str(DATASET_ID), "-tr", "nnUNetTrainerNoSuchLoss",
                       "--device", "cpu", "--raw", str(experiment.nnunet_raw), "--preprocessed",
                       str(experiment.nnunet_preprocessed), "--results", str(experiment.nnunet_results)])
    assert code == 2 and "nnUNetTrainerNoSuchLoss not found" in capsys.readouterr().err and not new.exists()


def test_sbatch_scripts_set_the_environment_and_continue(tmp_path):
    from nnunetv2_l1dfl.experiment.slurm import write_scripts

    experiment = _experiment(tmp_path, npz=True)
    experiment.slurm.partition, experiment.slurm.gres, experiment.slurm.sbatch_args = "gpu", "gpu:1", ["--qos=x"]
    experiment.device = "cuda"
    write_toy_dataset(experiment.nnunet_raw)
    scripts = write_scripts(experiment, "Dataset917_XpToy")
    for path in scripts.values():
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            assert f"export {name}={getattr(experiment, name.lower().replace('nnunet_', 'nnunet_'))}" in text
        ext = next(ln for ln in text.splitlines() if ln.startswith("export nnUNet_extTrainer="))
        assert ext.split("=", 1)[1].split(os.pathsep)[0] == str(tmp_path / "trainers")
        assert ext.endswith("nnunet_trainers") and "#SBATCH --partition=gpu" in text and "#SBATCH --qos=x" in text
    train = scripts["train"].read_text()
    assert "#SBATCH --requeue" in train and "#SBATCH --gres=gpu:1" in train and "#SBATCH --array=0-3" in train
    assert '-tr "$TRAINER"' in train and "--npz --c" in train and "checkpoint_final.pth" in train
    assert "#SBATCH --gres" not in scripts["preprocess"].read_text()
    jobs = train_jobs(experiment)
    for i, job in enumerate(jobs):
        assert f"'{job.trainer} {job.configuration} {job.fold}'  # {i}" in train


def _processes_using(results: Path) -> list[str]:
    """Command lines of live processes whose nnUNet_results is ``results`` (this test's, not a parallel one's)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if f"nnUNet_results={results}".encode() in environ:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.slow
def test_local_run_interrupted_and_rerun(tmp_path):
    """run: preprocess, 4 trainings one after the other on CPU, collect; Ctrl-C during the second
    training stops it (no process left), the re-run continues it with --c and redoes nothing else."""
    experiment = _experiment(tmp_path, find_best_configuration=False)
    write_toy_dataset(experiment.nnunet_raw)
    write_trainers(tmp_path / "trainers", epochs=2)
    env = quiet_nnunet_env()
    l1dfl("experiment", "init", str(experiment.path), "-d", str(DATASET_ID), "-tr", *TRAINERS, "--folds", "0", "1",
          "--device", "cpu", "--raw", str(experiment.nnunet_raw), "--preprocessed", str(experiment.nnunet_preprocessed),
          "--results", str(experiment.nnunet_results), "--trainer-folder", str(tmp_path / "trainers"), "-np", "1",
          env=env)
    experiment = load(experiment.path)
    experiment.find_best_configuration = False  # covered through SLURM; saves a minute here
    experiment.compare_args = ["-np", "1", "--no-plots"]
    save(experiment)
    plan = l1dfl("experiment", "plan", str(experiment.path), env=env).stdout
    assert "[todo] preprocess" in plan and plan.count("[todo] train") == 4 and "--c" in plan

    jobs = train_jobs(experiment)
    dataset = "Dataset917_XpToy"
    first, second = (fold_folder(experiment, j, dataset) for j in jobs[:2])
    repo = str(Path(__file__).resolve().parents[1])
    full_env = dict(os.environ, **env, PYTHONPATH=repo)
    proc = subprocess.Popen([sys.executable, "-m", "nnunetv2_l1dfl.cli", "experiment", "run", str(experiment.path),
                             "--no-progress"], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for(lambda: training_done(first) and (second / "checkpoint_latest.pth").is_file(), 1200,
                 "the first training to finish and the second to write a checkpoint")
        assert _processes_using(experiment.nnunet_results), "the check below would see no training"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Run the same command again" in out
    assert not training_done(second)
    leftovers = _processes_using(experiment.nnunet_results)
    assert not leftovers, f"training processes left after Ctrl-C: {leftovers}"
    first_final = (first / "checkpoint_final.pth").stat().st_mtime
    epochs_before = training_progress(second).epochs_done
    assert epochs_before >= 1
    status = l1dfl("experiment", "status", str(experiment.path), env=env).stdout
    assert "interrupted (re-run continues)" in status and "done" in status

    out = l1dfl("experiment", "run", str(experiment.path), "--no-progress", env=env).stdout
    assert "3 job(s) finished, 0 failed" in out or "4 job(s) finished, 0 failed" in out, out
    assert all(training_done(fold_folder(experiment, j, dataset)) for j in jobs)
    assert (first / "checkpoint_final.pth").stat().st_mtime == first_final, "a finished training was redone"
    assert len(list(first.glob("training_log_*.txt"))) == 1
    progress = training_progress(second)
    assert progress.logs == 2 and progress.first_epoch_of_last_log == epochs_before, "not continued with --c"
    report = experiment.folder / "report"
    summary = json.loads((report / "3d_fullres" / "summary.json").read_text())
    assert summary["trainers"] == list(TRAINERS) and (report / "3d_fullres" / "report.md").is_file()
    assert (report / "collect.done").is_file()
    status = l1dfl("experiment", "status", str(experiment.path), env=env).stdout
    assert "4/4 trainings done" in status and "collect done" in status and "2/2" in status
    # Nothing left: a third run starts nothing.
    out = l1dfl("experiment", "run", str(experiment.path), "--no-progress", env=env).stdout
    assert "0 job(s) finished, 0 failed, 0 not started" in out


def test_check_passes_on_a_declared_experiment(tmp_path):
    experiment = _experiment(tmp_path)
    write_toy_dataset(experiment.nnunet_raw)
    assert check(experiment, resolve=False) == "Dataset917_XpToy"


def test_status_from_locks_queue_and_events(tmp_path, monkeypatch):
    """A job whose lock is held is 'running'; squeue states map to rows; a pending job whose dependency
    failed is 'blocked'; a job that left the queue gets its state from its events file."""
    from nnunetv2_l1dfl.experiment.jobs import JobLock, append_event, lock_path
    from nnunetv2_l1dfl.experiment.status import experiment_status

    experiment = _experiment(tmp_path)
    write_toy_dataset(experiment.nnunet_raw)
    jobs = train_jobs(experiment)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\nprintf '7_1|RUNNING|None\\n8|PENDING|DependencyNeverSatisfied\\n'\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\nexit 1\n")  # the job is no longer known to slurmctld
    for name in ("squeue", "scontrol"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (experiment.folder / "slurm").mkdir(parents=True)
    (experiment.folder / "slurm" / "submissions.json").write_text(json.dumps([
        {"jobs": {jobs[1].key: "7_1", jobs[2].key: "7_2", "collect": "8"}}]))
    append_event(experiment, jobs[2].key, "START slurm=7_2 host=node3")
    append_event(experiment, jobs[2].key, "END rc=1 slurm=7_2")
    (experiment.folder / "logs").mkdir()
    (experiment.folder / "logs" / f"{jobs[2].key}.log").write_text("epoch 0\nRuntimeError: CUDA out of memory\n")
    append_event(experiment, jobs[3].key, "START slurm=7_3 host=node4")  # killed without an END line
    lock = JobLock(lock_path(experiment, jobs[0].key))
    assert lock.acquire()
    try:
        rows = {r.key: r for r in experiment_status(experiment)}
    finally:
        lock.release()
    assert rows["preprocess"].state == "not started"
    assert rows[jobs[0].key].state.startswith("running (pid=") and rows[jobs[0].key].epochs == "0/?"
    assert rows[jobs[1].key].state == "running (slurm)" and rows[jobs[1].key].slurm_id == "7_1"
    assert rows[jobs[2].key].state == "failed (exit 1)"
    assert rows[jobs[2].key].log_tail[-1] == "RuntimeError: CUDA out of memory"
    assert rows[jobs[3].key].state == "lost (started, no end recorded)"
    assert rows["collect"].state.startswith("blocked")
    assert not any(r.failed for r in (rows[jobs[0].key], rows[jobs[1].key], rows["collect"]))


def test_gpu_slots_and_ddp_command(tmp_path, monkeypatch):
    from nnunetv2_l1dfl.experiment.jobs import TrainJob, train_command
    from nnunetv2_l1dfl.experiment.local import gpu_slots

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cpu = _experiment(tmp_path)
    assert gpu_slots(cpu, "0,1,2") == [None]  # CPU: one training at a time
    cuda = _experiment(tmp_path, device="cuda")
    assert gpu_slots(cuda, "0,1,2,3") == ["0", "1", "2", "3"] and gpu_slots(cuda, None) == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert gpu_slots(cuda, None) == ["4", "5"]
    ddp = _experiment(tmp_path, device="cuda", num_gpus=2)
    assert gpu_slots(ddp, "0,1,2,3,4") == ["0,1", "2,3"]
    with pytest.raises(ExperimentError, match="num_gpus 2 per training, but only GPU"):
        gpu_slots(ddp, "7")
    cmd = train_command(ddp, TrainJob("nnUNetTrainerL1DFL", "3d_fullres", 3))
    assert cmd[-8:] == ["-p", "nnUNetPlans", "-device", "cuda", "-num_gpus", "2", "--npz", "--c"]
    assert cmd[cmd.index("-tr") - 3:cmd.index("-tr") + 2] == [str(DATASET_ID), "3d_fullres", "3", "-tr",
                                                              "nnUNetTrainerL1DFL"]
    assert "-num_gpus" not in train_command(cuda, TrainJob("nnUNetTrainerL1DFL", "3d_fullres", 3))
