"""``l1dfl demo``: the whole workflow in one command, on the embedded synthetic PSMA PET/CT cohort.

Stages, each resumable (a marker file per finished stage or fold; a re-run continues where it
stopped), each subprocess writing to ``WORKDIR/logs/<stage>.log``:

1. ``phantom``   synthetic DICOM cohort -> ``WORKDIR/phantom`` (``l1dfl phantom``, in-process)
   (the training cohort in ``phantom/dicom``, held-out test studies of other patients in
   ``phantom/heldout_dicom``)
2. ``convert``   ``l1dfl convert dicom WORKDIR/phantom/dicom -d ID -n NAME -o WORKDIR/nnUNet_raw --write-splits``
3. ``plan``      ``nnUNetv2_plan_and_preprocess -d ID -c CONFIG -np 1 -npfp 1 --verify_dataset_integrity``
                 (CONFIG: ``2d`` on CPU, ``3d_fullres`` on CUDA); the plan is then capped where the
                 device defaults say so (patch edge, batch size, network width; see :func:`cap_plans`)
                 so that training fits the time budget
4. ``train``     ``nnUNetv2_train ID CONFIG FOLD -tr T --npz`` for the stock ``nnUNetTrainer`` and
                 ``nnUNetTrainerL1DFL``, both as schedule subclasses with the same epochs,
                 iterations, foreground oversampling and folds (``nnunetv2_l1dfl.training.schedules``)
5. ``compare``   ``l1dfl compare -d ID -c CONFIG -tr <stock> <l1dfl> -f FOLDS -o WORKDIR/report``
6. ``predict``   ``l1dfl predict WORKDIR/phantom/heldout_dicom -o WORKDIR/predict -d ID -c CONFIG
                 -tr <l1dfl> -f FOLDS --device DEVICE``: DICOM in, DICOM SEG, RTSTRUCT and lesion report out

The subprocesses get ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` inside the
work folder (the user's own folders are never touched) and ``nnUNet_extTrainer`` pointing at the
generated trainer module. Nothing needs the network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BASE_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerL1DFL")
PREDICT_TRAINER = "nnUNetTrainerL1DFL"
CONFIGURATIONS = ("2d", "3d_fullres")
PLANS = "nnUNetPlans"
SCHEDULE_SUFFIX = "demo"

#: Defaults per device. CPU: the 2d configuration (a 2d U-Net step costs a fraction of a 3d one on
#: CPU, and each step sees a batch of whole slices), 8 slices per batch, half of them forced to hold
#: a lesion, 1125 steps (45 epochs of 25), measured at 13-14 minutes on an idle 2-core machine
#: (docs/demo.md). (With 16 slices and
#: 500 steps the stock trainer's train loss only turned negative, i.e. its Dice started to grow,
#: after about 250 steps: the number of steps, not the slices per step, limits learning here; see
#: docs/demo.md.) CUDA: nnU-Net's 3d_fullres plan, a small real experiment (five folds, 100 epochs of
#: 100 iterations).
DEVICE_DEFAULTS = {
    "cpu": {"configuration": "2d", "cases": 20, "heldout": 2, "epochs": 45, "iterations": 25, "val_iterations": 1,
            "folds": [0], "max_patch": 0, "max_batch": 8, "base_features": 16, "oversample": 0.5},
    "cuda": {"configuration": "3d_fullres", "cases": 60, "heldout": 4, "epochs": 100, "iterations": 100,
             "val_iterations": 10, "folds": [0, 1, 2, 3, 4], "max_patch": 0, "max_batch": 0, "base_features": 0,
             "oversample": 0.33},
}

# progress.png is drawn every PLOT_EVERY epochs and at the last (drawing it after each of the CPU
# demo's 7-second epochs cost about 1.4 s, a sixth of the training time).
PLOT_EVERY = 5

# Settings that must not change within one work folder (they change data or trained models).
_FINGERPRINT_KEYS = ("cases", "heldout", "seed", "size", "dataset_id", "dataset_name", "configuration", "epochs",
                     "iterations", "val_iterations", "max_patch", "max_batch", "base_features", "oversample")


class DemoStageError(RuntimeError):
    """A stage failed; the message names the stage, the log file to read and the output's last lines."""

    def __init__(self, stage: str, log_path: Path | None, detail: str, tail: Sequence[str] = ()):
        self.stage, self.log_path = stage, log_path
        message = f"stage '{stage}' failed: {detail}"
        if log_path is not None:
            message += f"; read {log_path}"
        if tail:
            message += "\n  last lines of its output:\n    " + "\n    ".join(tail)
        super().__init__(message)


@dataclass
class DemoConfig:
    """Settings of one demo run (see ``l1dfl demo --help``); ``workers`` is ``-np``."""

    workdir: Path
    cases: int = 20
    seed: int = 0
    size: str = "default"
    epochs: int = 40
    iterations: int = 25
    val_iterations: int = 1
    folds: list[int] = field(default_factory=lambda: [0])
    device: str = "cpu"
    dataset_id: int = 901
    dataset_name: str = "L1DFLPhantom"
    configuration: str = "2d"
    max_patch: int = 0
    max_batch: int = 8
    base_features: int = 16
    oversample: float = 0.5
    heldout: int = 2
    workers: int = 1

    @property
    def dataset_folder(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    def fingerprint(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _FINGERPRINT_KEYS}


# --------------------------------------------------------------------------------------------------
# Work folder, markers and subprocesses
# --------------------------------------------------------------------------------------------------
class WorkFolder:
    """Paths of one demo run and its stage markers (``WORKDIR/.stages/<stage>.done``, JSON)."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.phantom = self.root / "phantom"
        self.raw = self.root / "nnUNet_raw"
        self.preprocessed = self.root / "nnUNet_preprocessed"
        self.results = self.root / "nnUNet_results"
        self.trainers = self.root / "trainers"
        self.logs = self.root / "logs"
        self.report = self.root / "report"
        self.predict = self.root / "predict"
        self.stages = self.root / ".stages"
        self.config = self.root / "demo.json"

    def create(self) -> None:
        for folder in (self.raw, self.preprocessed, self.results, self.trainers, self.logs, self.stages):
            folder.mkdir(parents=True, exist_ok=True)

    def log(self, stage: str) -> Path:
        return self.logs / f"{stage}.log"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.done"

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.marker(stage)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def mark_done(self, stage: str, seconds: float, **detail: Any) -> None:
        data = {"stage": stage, "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **detail}
        tmp = self.marker(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        tmp.replace(self.marker(stage))

    def forget(self, stage: str) -> None:
        self.marker(stage).unlink(missing_ok=True)


def checkout_root(package_init: Path) -> str | None:
    """The folder holding the ``nnunetv2_l1dfl`` package when it runs from a checkout, else None.

    An installed package needs no PYTHONPATH entry, and must not get one: putting site-packages on
    PYTHONPATH ranks it before the standard library, and the ``argparse`` 1.4 backport that
    nnU-Net's dependencies install there would then shadow the standard ``argparse``.
    """
    import site
    import sysconfig

    parent = os.path.realpath(package_init.resolve().parents[1])
    site_dirs = set(site.getsitepackages()) | {site.getusersitepackages()}
    site_dirs |= {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return None if parent in {os.path.realpath(d) for d in site_dirs} else parent


def subprocess_environment(work: WorkFolder, device: str) -> dict[str, str]:
    """The environment of every stage: nnU-Net folders inside the work folder, our trainer folders."""
    import nnunetv2_l1dfl

    env = dict(os.environ)
    env["nnUNet_raw"] = str(work.raw)
    env["nnUNet_preprocessed"] = str(work.preprocessed)
    env["nnUNet_results"] = str(work.results)
    # The generated short-schedule trainers, then this package's own (also when it is not installed).
    package_trainers = Path(nnunetv2_l1dfl.__file__).resolve().parent / "nnunet_trainers"
    env["nnUNet_extTrainer"] = os.pathsep.join([str(work.trainers), str(package_trainers)])
    # Subprocesses import the same nnunetv2_l1dfl as this process: a checkout goes on PYTHONPATH.
    checkout = checkout_root(Path(nnunetv2_l1dfl.__file__))
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join([checkout] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("nnUNet_compile", "f")  # compiling costs minutes; the demo's runs are short
    cpus = os.cpu_count() or 1
    # Data-augmentation workers, and nnU-Net's default process count: its export pool at validation
    # (8 processes by default, each importing torch: a minute on a 2-core machine) and the torch
    # threads it predicts with. (The training stage may lower it: training_environment.)
    env.setdefault("nnUNet_n_proc_DA", str(max(1, min(cpus - 1, 4 if device == "cpu" else 8))))
    env.setdefault("nnUNet_def_n_proc", str(max(1, min(cpus, 4))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_MININTERVAL", "5")
    return env


def run_logged(stage: str, cmd: Sequence[str], env: dict[str, str], log_path: Path,
               on_line: Callable[[str], None] | None = None) -> None:
    """Run ``cmd``, appending its stdout and stderr to ``log_path``; raise DemoStageError on failure.

    ``on_line`` sees each output line (progress parsing). Each run's part of the log starts with
    the time and the command line; earlier attempts stay above it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                    errors="replace", bufsize=1)
        except OSError as e:
            raise DemoStageError(stage, log_path, f"cannot start {cmd[0]}: {e}") from e
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()  # the log is what a user reads while a long stage runs
                if on_line is not None:
                    on_line(line)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        code = proc.wait()
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise DemoStageError(stage, log_path, f"exit code {code}", tail)


def _python_entry(module: str, function: str, prog: str) -> list[str]:
    """``python -c`` calling a console-script function (argv[0] set to its usual name)."""
    return [sys.executable, "-c",
            f"import sys; sys.argv[0] = {prog!r}; from {module} import {function}; sys.exit({function}())"]


# --------------------------------------------------------------------------------------------------
# Plans for CPU
# --------------------------------------------------------------------------------------------------
def cap_plans(plans_path: Path, configuration: str, max_patch: int, base_features: int,
              max_batch: int = 0) -> dict[str, Any]:
    """Shrink one configuration of the plan for CPU training; returns what changed (empty when nothing did).

    The patch edge is capped at ``max_patch`` voxels per axis and the network topology recomputed
    with nnU-Net's own ``get_pool_and_conv_props`` (as its planner does), so strides, kernel sizes
    and the number of stages stay consistent; ``features_per_stage`` becomes ``base_features * 2**i``
    (at most the plan's own widest stage, 320 in 3d and 512 in 2d); the batch size is capped at
    ``max_batch``. Spacing, normalization and preprocessed data are unchanged. Both trainers use
    the same plan, so the comparison stays fair. The original plan is kept as
    ``nnUNetPlans.json.orig`` and the change recorded under ``l1dfl_demo_cap`` in the plans.
    A value of 0 leaves that part as planned.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    plans = json.loads(plans_path.read_text(encoding="utf-8"))
    if "l1dfl_demo_cap" in plans:
        return plans["l1dfl_demo_cap"]
    config = plans["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    before = {"patch_size": list(config["patch_size"]), "batch_size": config["batch_size"],
              "features_per_stage": list(arch["features_per_stage"]), "n_stages": arch["n_stages"]}
    widest = max(int(f) for f in arch["features_per_stage"])
    patch = [min(int(p), max_patch) if max_patch > 0 else int(p) for p in config["patch_size"]]
    if patch != before["patch_size"]:
        _, strides, kernels, patch, _ = get_pool_and_conv_props(config["spacing"], patch, 4, 999999)
        strides = [[int(s) for s in st] for st in strides]
        kernels = [[int(k) for k in ks] for ks in kernels]
    else:
        strides, kernels = arch["strides"], arch["kernel_sizes"]
    n_stages = len(strides)
    first = base_features if base_features > 0 else int(arch["features_per_stage"][0])
    features = [min(widest, first * 2**i) for i in range(n_stages)]
    batch = min(int(config["batch_size"]), max_batch) if max_batch > 0 else int(config["batch_size"])
    after = {"patch_size": [int(p) for p in patch], "batch_size": batch, "features_per_stage": features,
             "n_stages": n_stages}
    if after == before:
        return {}
    (plans_path.parent / (plans_path.name + ".orig")).write_text(json.dumps(plans, indent=1), encoding="utf-8")
    config["patch_size"] = after["patch_size"]
    config["batch_size"] = batch
    arch.update(n_stages=n_stages, features_per_stage=features, kernel_sizes=kernels, strides=strides,
                n_conv_per_stage=[2] * n_stages, n_conv_per_stage_decoder=[2] * (n_stages - 1))
    change = {"reason": f"l1dfl demo on CPU: smaller {configuration} patch, batch and network so training fits "
                        "the time budget", "configuration": configuration, "before": before, "after": after}
    plans["l1dfl_demo_cap"] = change
    tmp = plans_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plans, indent=1), encoding="utf-8")
    tmp.replace(plans_path)
    return change


def cap_3d_fullres_plans(plans_path: Path, max_patch: int, base_features: int) -> dict[str, Any]:
    """:func:`cap_plans` of the 3d_fullres configuration (batch size as planned)."""
    return cap_plans(plans_path, "3d_fullres", max_patch, base_features)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
class Progress:
    """One overall bar over the stages, stage-specific text in its postfix; on a terminal only.

    Without a terminal (CI logs, pipes) each stage start is printed as one line instead.
    """

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.total, self.count, self.start = total, 0, time.perf_counter()
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="l1dfl demo", unit="stage", disable=not enabled or self.lines,
                        bar_format="{desc} {n_fmt}/{total_fmt} |{bar:16}| {elapsed}{postfix}")

    def stage(self, name: str) -> None:
        self.bar.set_description(f"l1dfl demo [{name}]")
        if self.lines:
            print(f"[{self.count + 1}/{self.total}] {name} ({time.perf_counter() - self.start:.0f} s)",
                  file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text[:70], refresh=True)

    def advance(self) -> None:
        self.count += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _stage_phantom(cfg: DemoConfig, work: WorkFolder, progress: Progress) -> dict[str, Any]:
    from nnunetv2_l1dfl.phantom.generate import generate_cohort

    log_path = work.log("phantom")
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    phantom_logger = logging.getLogger("nnunetv2_l1dfl.phantom")
    phantom_logger.addHandler(handler)
    phantom_logger.propagate = False  # to the log file only, not across the progress bar
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        progress.note(f"{cfg.cases} studies, size {cfg.size}")
        summary = generate_cohort(work.phantom, n_cases=cfg.cases, seed=cfg.seed, size=cfg.size,
                                  workers=cfg.workers, progress=False, heldout=cfg.heldout)
    except Exception as e:  # any failure is reported with its stage and log
        phantom_logger.exception("phantom generation failed")
        raise DemoStageError("phantom", log_path, f"{type(e).__name__}: {e}") from e
    finally:
        phantom_logger.removeHandler(handler)
        phantom_logger.propagate = True
        handler.close()
    return {"studies": len(summary.studies), "lesions": summary.n_lesions,
            "heldout_studies": len(summary.heldout_studies)}


def _stage_convert(cfg: DemoConfig, work: WorkFolder, env: dict[str, str], progress: Progress) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "nnunetv2_l1dfl.cli", "convert", "dicom", str(work.phantom / "dicom"),
           "-d", str(cfg.dataset_id), "-n", cfg.dataset_name, "-o", str(work.raw), "--write-splits",
           "-np", str(cfg.workers), "--no-progress"]
    pattern = re.compile(r"case (\S+):")
    run_logged("convert", cmd, env, work.log("convert"),
               lambda line: (m := pattern.search(line)) and progress.note(f"converted {m.group(1)}"))
    dataset = work.raw / cfg.dataset_folder / "dataset.json"
    if not dataset.is_file():
        raise DemoStageError("convert", work.log("convert"), f"the converter finished but wrote no {dataset}")
    splits = work.preprocessed / cfg.dataset_folder / "splits_final.json"
    if not splits.is_file():
        raise DemoStageError("convert", work.log("convert"), f"the converter wrote no {splits}")
    return {"dataset": str(dataset.parent), "num_training": json.loads(dataset.read_text())["numTraining"]}


def _stage_plan(cfg: DemoConfig, work: WorkFolder, env: dict[str, str], progress: Progress) -> dict[str, Any]:
    cmd = _python_entry("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "plan_and_preprocess_entry",
                        "nnUNetv2_plan_and_preprocess")
    cmd += ["-d", str(cfg.dataset_id), "-c", cfg.configuration, "-np", str(cfg.workers), "-npfp", str(cfg.workers),
            "--verify_dataset_integrity"]
    run_logged("plan", cmd, env, work.log("plan"),
               lambda line: line.strip() in ("Fingerprint extraction...", "Experiment planning...", "Preprocessing...")
               and progress.note(line.strip()))
    plans_path = work.preprocessed / cfg.dataset_folder / f"{PLANS}.json"
    if not plans_path.is_file():
        raise DemoStageError("plan", work.log("plan"), f"nnU-Net wrote no {plans_path}")
    change = cap_plans(plans_path, cfg.configuration, cfg.max_patch, cfg.base_features, cfg.max_batch)
    config = json.loads(plans_path.read_text(encoding="utf-8"))["configurations"][cfg.configuration]
    return {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
            "features_per_stage": config["architecture"]["arch_kwargs"]["features_per_stage"], "capped": bool(change)}


def fold_folder(cfg: DemoConfig, work: WorkFolder, trainer: str, fold: int) -> Path:
    return work.results / cfg.dataset_folder / f"{trainer}__{PLANS}__{cfg.configuration}" / f"fold_{fold}"


def _fold_finished(folder: Path) -> bool:
    return (folder / "checkpoint_final.pth").is_file() and (folder / "validation" / "summary.json").is_file()


def training_environment(env: dict[str, str], device: str) -> dict[str, str]:
    """``env`` for ``nnUNetv2_train``: on a CPU of 2 cores or fewer, augmentation in the training process.

    ``nnUNet_n_proc_DA=0`` makes nnU-Net use its SingleThreadedAugmenter; a worker process would
    only compete with the network for the two cores (measured 6.2 s vs 7.3 s per 25-step epoch of
    the CPU demo, docs/demo.md). Only for training: nnU-Net's planner passes the same variable to
    ``torch.set_num_threads``, which refuses 0. A value the user set is kept.
    """
    if device == "cpu" and (os.cpu_count() or 1) <= 2 and "nnUNet_n_proc_DA" not in os.environ:
        return {**env, "nnUNet_n_proc_DA": "0"}
    return env


def _stage_train(cfg: DemoConfig, work: WorkFolder, env: dict[str, str], progress: Progress, trainer: str,
                 fold: int) -> dict[str, Any]:
    stage = f"train_{trainer}_fold{fold}"
    folder = fold_folder(cfg, work, trainer, fold)
    if not _fold_finished(folder):
        cmd = _python_entry("nnunetv2.run.run_training", "run_training_entry", "nnUNetv2_train")
        cmd += [str(cfg.dataset_id), cfg.configuration, str(fold), "-tr", trainer, "-p", PLANS, "-device", cfg.device,
                "--npz", "--c"]  # --c: continue from a checkpoint when a previous run was interrupted
        epoch = re.compile(r"Epoch (\d+)\s*$")
        predicting = re.compile(r"predicting (\S+)")
        pseudo_dice = re.compile(r"Pseudo dice \[(.*)\]")
        number = re.compile(r"\d+\.\d+")

        def on_line(line: str) -> None:
            if m := epoch.search(line):
                progress.note(f"{trainer} fold {fold}: epoch {int(m.group(1)) + 1}/{cfg.epochs}")
            elif m := pseudo_dice.search(line):
                values = number.findall(m.group(1)) or [m.group(1)]
                progress.note(f"{trainer} fold {fold}: pseudo Dice {' '.join(values)}")
            elif m := predicting.search(line):
                progress.note(f"{trainer} fold {fold}: validating {m.group(1)}")

        run_logged(stage, cmd, training_environment(env, cfg.device), work.log(stage), on_line)
        if not _fold_finished(folder):
            raise DemoStageError(stage, work.log(stage), f"nnU-Net exited without checkpoint_final.pth and "
                                 f"validation/summary.json in {folder}")
    summary = json.loads((folder / "validation" / "summary.json").read_text(encoding="utf-8"))
    dice = summary.get("foreground_mean", {}).get("Dice")
    return {"fold_folder": str(folder), "validation_mean_dice": dice}


def _stage_compare(cfg: DemoConfig, work: WorkFolder, env: dict[str, str], progress: Progress,
                   trainers: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "nnunetv2_l1dfl.cli", "compare", "-d", str(cfg.dataset_id), "-c", cfg.configuration,
           "-tr", *trainers, "-p", PLANS, "-f", *(str(f) for f in cfg.folds), "-o", str(work.report),
           "--overwrite", "-np", str(cfg.workers)]
    progress.note(f"{' vs '.join(trainers)} on folds {' '.join(str(f) for f in cfg.folds)}")
    run_logged("compare", cmd, env, work.log("compare"))
    summary = work.report / "summary.json"
    if not summary.is_file():
        raise DemoStageError("compare", work.log("compare"), f"l1dfl compare wrote no {summary}")
    return {"report": str(work.report / "report.md"), "folds": list(cfg.folds)}


def _stage_predict(cfg: DemoConfig, work: WorkFolder, env: dict[str, str], progress: Progress,
                   trainer: str) -> dict[str, Any]:
    """``l1dfl predict`` of the held-out phantom studies with the L1DFL model: DICOM in, DICOM out."""
    heldout = work.phantom / "heldout_dicom"
    cmd = [sys.executable, "-m", "nnunetv2_l1dfl.cli", "predict", str(heldout), "-o", str(work.predict),
           "-d", str(cfg.dataset_id), "-c", cfg.configuration, "-tr", trainer, "-p", PLANS,
           "-f", *(str(f) for f in cfg.folds), "--device", cfg.device, "--overwrite", "--no-progress"]
    progress.note(f"{trainer} on {cfg.heldout} held-out studies")
    run_logged("predict", cmd, env, work.log("predict"))
    studies = sorted(p.parent for p in work.predict.glob("*/seg.dcm"))
    if len(studies) != cfg.heldout:
        raise DemoStageError("predict", work.log("predict"), f"l1dfl predict wrote {len(studies)} DICOM SEG(s) "
                             f"into {work.predict}, expected one per held-out study ({cfg.heldout})")
    missing = [str(s / name) for s in studies for name in ("lesions.csv", "rtstruct.dcm") if not (s / name).is_file()]
    if missing:
        raise DemoStageError("predict", work.log("predict"), f"l1dfl predict did not write {', '.join(missing)}")
    return {"output": str(work.predict), "studies": [s.name for s in studies], "trainer": trainer,
            "folds": list(cfg.folds)}


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------
def _check_config(cfg: DemoConfig, work: WorkFolder) -> None:
    """Refuse to continue a work folder made with other data or schedule settings."""
    if work.config.is_file():
        previous = json.loads(work.config.read_text(encoding="utf-8"))
        old = previous.get("fingerprint", {})
        new = cfg.fingerprint()
        diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
        if diff:
            details = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
            raise DemoStageError("setup", None, f"{work.root} holds a demo made with other settings ({details}); "
                                 "use another --workdir or delete that folder")
    elif work.root.exists() and any(work.root.iterdir()):
        raise DemoStageError("setup", None, f"{work.root} is not empty and holds no demo (demo.json missing); "
                             "choose a new or empty --workdir")
    data = {"fingerprint": cfg.fingerprint(), "last_run": {**asdict(cfg), "workdir": str(cfg.workdir)}}
    work.root.mkdir(parents=True, exist_ok=True)
    work.config.write_text(json.dumps(data, indent=1), encoding="utf-8")


def run_demo(cfg: DemoConfig, progress_enabled: bool = True) -> dict[str, Any]:
    """Run (or continue) every stage; returns ``{'report': path, 'summary': summary.json dict, 'stages': ...}``.

    Raises DemoStageError naming the failed stage and its log.
    """
    from nnunetv2_l1dfl.training.schedules import write_schedule_trainers

    work = WorkFolder(cfg.workdir)
    _check_config(cfg, work)
    work.create()
    names = write_schedule_trainers(work.trainers, num_epochs=cfg.epochs, iterations_per_epoch=cfg.iterations,
                                    val_iterations=cfg.val_iterations, suffix=SCHEDULE_SUFFIX, bases=BASE_TRAINERS,
                                    oversample_foreground=cfg.oversample, plot_every=PLOT_EVERY)
    trainers = [names[b] for b in BASE_TRAINERS]
    env = subprocess_environment(work, cfg.device)

    stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("phantom", lambda: _stage_phantom(cfg, work, progress)),
        ("convert", lambda: _stage_convert(cfg, work, env, progress)),
        ("plan", lambda: _stage_plan(cfg, work, env, progress)),
    ]
    for fold in cfg.folds:
        for trainer in trainers:
            stages.append((f"train_{trainer}_fold{fold}",
                           lambda t=trainer, f=fold: _stage_train(cfg, work, env, progress, t, f)))
    stages.append(("compare", lambda: _stage_compare(cfg, work, env, progress, trainers)))
    if cfg.heldout > 0:
        stages.append(("predict", lambda: _stage_predict(cfg, work, env, progress, names[PREDICT_TRAINER])))

    # The comparison and the prediction depend on the folds: redo them when they changed since.
    for stage in ("compare", "predict"):
        previous = work.done(stage)
        if previous is not None and previous.get("folds") != list(cfg.folds):
            work.forget(stage)

    progress = Progress(len(stages), progress_enabled)
    results: dict[str, Any] = {}
    try:
        for name, run in stages:
            progress.stage(name)
            marker = work.done(name)
            if marker is not None:
                results[name] = marker
                progress.note("done earlier")
            else:
                start = time.perf_counter()
                detail = run()
                work.mark_done(name, time.perf_counter() - start, **detail)
                results[name] = work.done(name)
                logger.debug("stage %s finished in %.1f s", name, time.perf_counter() - start)
            progress.advance()
    finally:
        progress.close()
    summary = json.loads((work.report / "summary.json").read_text(encoding="utf-8"))
    return {"report": work.report / "report.md", "summary": summary, "stages": results, "trainers": trainers,
            "predict": results.get("predict")}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _resolve_device(requested: str) -> str:
    if requested != "auto":
        if requested == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise DemoStageError("setup", None, "--device cuda asked for, but torch sees no CUDA GPU")
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    device = _resolve_device(args.device)
    defaults = DEVICE_DEFAULTS[device]

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    cfg = DemoConfig(
        workdir=Path(args.workdir), cases=pick("cases"), seed=args.seed, size=args.size, epochs=pick("epochs"),
        iterations=pick("iterations"), val_iterations=pick("val_iterations"), folds=sorted(set(pick("folds"))),
        device=device, dataset_id=args.dataset_id, dataset_name=args.dataset_name,
        configuration=pick("configuration"), max_patch=pick("max_patch"), max_batch=pick("max_batch"),
        base_features=pick("base_features"), oversample=float(pick("oversample")), heldout=pick("heldout"),
        workers=args.np,
    )
    for name in ("cases", "epochs", "iterations", "val_iterations", "np"):
        value = getattr(cfg, "workers" if name == "np" else name)
        if value < 1:
            raise DemoStageError("setup", None, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("heldout", "max_patch", "max_batch", "base_features"):
        if getattr(cfg, name) < 0:
            raise DemoStageError("setup", None, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.oversample <= 1.0:
        raise DemoStageError("setup", None, f"--oversample must lie in [0, 1], got {cfg.oversample}")
    bad = [f for f in cfg.folds if not 0 <= f <= 4]
    if bad:
        raise DemoStageError("setup", None, f"--folds must be among 0 1 2 3 4 (the converter writes 5 folds), got {bad}")
    if not 1 <= cfg.dataset_id <= 999:
        raise DemoStageError("setup", None, f"--dataset-id must be 1-999, got {cfg.dataset_id}")
    return cfg


def demo_entry(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        cfg = config_from_args(args)
        print(f"l1dfl demo: {cfg.cases} synthetic PSMA PET/CT studies (size {cfg.size}), {cfg.epochs} epochs x "
              f"{cfg.iterations} iterations, folds {' '.join(map(str, cfg.folds))}, device {cfg.device}; "
              f"work folder {cfg.workdir.resolve()}")
        outcome = run_demo(cfg, progress_enabled=not args.no_progress)
    except DemoStageError as e:
        print(f"l1dfl demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("l1dfl demo: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    from nnunetv2_l1dfl.evaluation.report import headline_table

    print()
    print(headline_table(outcome["summary"]))
    print()
    print(f"report: {outcome['report']} (figures, cases.csv, lesions.csv and summary.json beside it)")
    print("These models trained for minutes on synthetic data: the demo shows the workflow, not a verdict on "
          "the loss (docs/demo.md).")
    predicted = outcome.get("predict")
    if predicted:
        out = Path(predicted["output"])
        print(f"held-out studies predicted by {predicted['trainer']} (l1dfl predict, DICOM in, DICOM out): "
              f"{out}/<case>/seg.dcm (DICOM SEG), rtstruct.dcm, lesions.csv / lesions.json (lesion report), mip.png; "
              f"cases: {', '.join(predicted['studies'])}")
    print(f"l1dfl demo finished in {(time.perf_counter() - start) / 60:.1f} min: {outcome['trainers'][0]} vs "
          f"{outcome['trainers'][1]} on {cfg.cases} phantom studies")
    return 0


def _describe_defaults(device: str) -> str:
    d = DEVICE_DEFAULTS[device]
    caps = [f"{label} {d[key]}" for key, label in (("max_patch", "patch edge <="), ("max_batch", "batch <="),
                                                   ("base_features", "width")) if d[key]]
    return (f"{device.upper()}: {d['configuration']}, {d['cases']} studies + {d['heldout']} held out, {d['epochs']} "
            f"epochs x {d['iterations']} iterations ({d['val_iterations']} validation), foreground oversampling "
            f"{d['oversample']:g}, folds {' '.join(map(str, d['folds']))}, "
            f"{'plan capped: ' + ', '.join(caps) if caps else 'nnU-Net plan'}")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole workflow on a synthetic PSMA PET/CT cohort: phantom -> convert -> plan -> train stock "
             "and L1DFL -> compare",
        description=(
            "Generate the embedded synthetic PSMA PET/CT cohort (DICOM) and held-out test studies of other "
            "patients, convert the cohort with 'l1dfl convert dicom', plan and preprocess it with nnU-Net, train "
            "nnUNetTrainer and nnUNetTrainerL1DFL with the same schedule and folds, compare them with 'l1dfl "
            "compare' (prints the report's headline table), and run 'l1dfl predict' with the L1DFL model on the "
            "held-out DICOM studies (DICOM SEG, RTSTRUCT and lesion report out). Everything goes into --workdir "
            "(nnU-Net's folders included; yours are not touched). Re-running the same command continues where it "
            "stopped. Defaults depend on the device: "
            f"{_describe_defaults('cpu')}; {_describe_defaults('cuda')}. The CPU defaults took 13.8 minutes "
            "on an idle 2-core machine (measured); the numbers show the workflow, not a verdict on the loss "
            "(see docs/demo.md)."
        ),
    )
    parser.add_argument("--workdir", default="l1dfl_demo", help="work folder (default: ./l1dfl_demo)")
    parser.add_argument("--cases", type=int, default=None, help="number of phantom training studies (default: per device)")
    parser.add_argument("--heldout", type=int, default=None,
                        help="held-out test studies of further patients for the predict stage, 0 = no predict "
                             "stage (default: per device)")
    parser.add_argument("--configuration", choices=CONFIGURATIONS, default=None,
                        help="nnU-Net configuration to plan and train (default: per device)")
    parser.add_argument("--size", choices=("small", "default", "wholebody"), default="default",
                        help="phantom image size, see 'l1dfl phantom --help' (default: default)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per training (default: per device)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per epoch (default: per device)")
    parser.add_argument("--val-iterations", dest="val_iterations", type=int, default=None,
                        help="validation iterations per epoch (default: per device)")
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="folds to train (default: per device)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="training device; auto = cuda when available (default: auto)")
    parser.add_argument("--max-patch", dest="max_patch", type=int, default=None,
                        help="cap of the patch edge in voxels, 0 = nnU-Net's plan (default: per device)")
    parser.add_argument("--max-batch", dest="max_batch", type=int, default=None,
                        help="cap of the batch size, 0 = nnU-Net's plan (default: per device)")
    parser.add_argument("--base-features", dest="base_features", type=int, default=None,
                        help="first-stage feature maps of the U-Net, 0 = nnU-Net's plan (default: per device)")
    parser.add_argument("--oversample", type=float, default=None,
                        help="nnU-Net's oversample_foreground_percent: share of each batch forced to hold a lesion, "
                             "the same for both trainers (default: per device; nnU-Net's own is 0.33)")
    parser.add_argument("--dataset-id", dest="dataset_id", type=int, default=901, help="nnU-Net dataset ID (default: 901)")
    parser.add_argument("--dataset-name", dest="dataset_name", default="L1DFLPhantom",
                        help="nnU-Net dataset name (default: L1DFLPhantom)")
    parser.add_argument("-np", type=int, default=min(os.cpu_count() or 1, 4),
                        help="worker processes for phantom, conversion and comparison (default: CPU cores, at most 4)")
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=demo_entry)
