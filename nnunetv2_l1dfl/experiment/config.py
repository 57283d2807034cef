"""EXPERIMENT.toml: the declared experiment, and the record of what was run.

Sections (docs/experiment.md has the full reference):

- ``[experiment]``: ``dataset`` (nnU-Net ID), ``configurations``, ``plans``, ``trainers``, ``folds``,
  ``device`` (cuda / cpu), ``npz`` (nnU-Net ``--npz``: probabilities for calibration and ensembling),
  ``num_gpus`` (nnU-Net ``-num_gpus``: DDP of one fold over N GPUs of one node).
- ``[paths]``: ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``, ``trainer_folders``
  (the user's own ``nnUNet_extTrainer`` folders; this package's trainer folder is always added).
- ``[preprocess]``: ``allowed``, ``num_processes``, ``verify_dataset_integrity``.
- ``[collect]``: ``find_best_configuration``, ``ensembling`` (let it try ensembles; needs ``npz``), ``compare``,
  ``compare_args`` (extra ``l1dfl compare`` options).
- ``[slurm]``: ``partition``, ``account``, ``time``, ``gres``, ``cpus_per_task``, ``mem``,
  ``sbatch_args``, ``allow_local_paths``, ``requeue_on_timeout``.

The experiment folder (scripts, logs, job records, report) is ``<file name without .toml>/`` beside
the file. Relative paths in the file are relative to the file's folder.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEVICES = ("cuda", "cpu")
#: Configurations a training job can run; the cascade needs the low-resolution predictions first.
SUPPORTED_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


class ExperimentError(Exception):
    """A one-line reason why an experiment cannot be planned, run or submitted."""


@dataclass
class SlurmOptions:
    partition: str = ""
    account: str = ""
    time: str = "48:00:00"
    gres: str = ""
    cpus_per_task: int = 8
    mem: str = ""
    sbatch_args: list[str] = field(default_factory=list)
    allow_local_paths: bool = False
    requeue_on_timeout: bool = True


@dataclass
class Experiment:
    """One experiment as declared in its TOML file; ``path`` is the file itself."""

    path: Path
    dataset: int
    trainers: list[str]
    configurations: list[str] = field(default_factory=lambda: ["3d_fullres"])
    plans: str = "nnUNetPlans"
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    device: str = "cuda"
    npz: bool = True
    num_gpus: int = 1
    nnunet_raw: Path | None = None
    nnunet_preprocessed: Path | None = None
    nnunet_results: Path | None = None
    trainer_folders: list[Path] = field(default_factory=list)
    preprocess_allowed: bool = True
    preprocess_processes: int = 4
    verify_dataset_integrity: bool = True
    find_best_configuration: bool = True
    ensembling: bool = True
    compare: bool = True
    compare_args: list[str] = field(default_factory=list)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    @property
    def folder(self) -> Path:
        """The experiment folder: scripts, logs, job records and the report."""
        return self.path.parent / self.path.name.removesuffix(".toml")

    @property
    def name(self) -> str:
        return self.folder.name

    def nnunet_paths(self) -> dict[str, Path]:
        """The three nnU-Net folders; raises ExperimentError when one is not set."""
        paths = {"nnUNet_raw": self.nnunet_raw, "nnUNet_preprocessed": self.nnunet_preprocessed,
                 "nnUNet_results": self.nnunet_results}
        missing = [k for k, v in paths.items() if v is None]
        if missing:
            raise ExperimentError(f"{self.path}: [paths] {', '.join(missing)} not set (and not in the environment "
                                  "when the file was written)")
        return {k: Path(v) for k, v in paths.items()}

    def validate(self) -> None:
        """Check values that need no file system (ranges, choices); raises ExperimentError."""
        where = f"{self.path}: [experiment]"
        if not 1 <= self.dataset <= 999:
            raise ExperimentError(f"{where} dataset must be an nnU-Net dataset ID 1-999, got {self.dataset}")
        if not self.trainers:
            raise ExperimentError(f"{where} trainers is empty")
        if len(set(self.trainers)) != len(self.trainers):
            raise ExperimentError(f"{where} trainers lists a trainer twice: {self.trainers}")
        if not self.configurations:
            raise ExperimentError(f"{where} configurations is empty")
        bad = [c for c in self.configurations if c not in SUPPORTED_CONFIGURATIONS]
        if bad:
            raise ExperimentError(f"{where} configuration(s) {bad} not supported; choose from "
                                  f"{list(SUPPORTED_CONFIGURATIONS)} (3d_cascade_fullres needs 3d_lowres predictions "
                                  "first; run it by hand after this experiment)")
        if not self.folds or len(set(self.folds)) != len(self.folds) or any(f < 0 for f in self.folds):
            raise ExperimentError(f"{where} folds must be distinct numbers >= 0, got {self.folds}")
        if self.device not in DEVICES:
            raise ExperimentError(f"{where} device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.num_gpus < 1:
            raise ExperimentError(f"{where} num_gpus must be >= 1, got {self.num_gpus}")
        if self.num_gpus > 1 and self.device != "cuda":
            raise ExperimentError(f"{where} num_gpus {self.num_gpus} needs device 'cuda' (nnU-Net's DDP is CUDA only)")
        if self.preprocess_processes < 1:
            raise ExperimentError(f"{self.path}: [preprocess] num_processes must be >= 1")
        if self.slurm.cpus_per_task < 1:
            raise ExperimentError(f"{self.path}: [slurm] cpus_per_task must be >= 1")

    def to_toml(self) -> dict[str, Any]:
        def rel(p: Path | None) -> str:
            return "" if p is None else str(p)

        slurm = asdict(self.slurm)
        return {
            "experiment": {
                "dataset": self.dataset, "configurations": list(self.configurations), "plans": self.plans,
                "trainers": list(self.trainers), "folds": list(self.folds), "device": self.device,
                "npz": self.npz, "num_gpus": self.num_gpus,
            },
            "paths": {
                "nnUNet_raw": rel(self.nnunet_raw), "nnUNet_preprocessed": rel(self.nnunet_preprocessed),
                "nnUNet_results": rel(self.nnunet_results), "trainer_folders": [str(p) for p in self.trainer_folders],
            },
            "preprocess": {"allowed": self.preprocess_allowed, "num_processes": self.preprocess_processes,
                           "verify_dataset_integrity": self.verify_dataset_integrity},
            "collect": {"find_best_configuration": self.find_best_configuration, "ensembling": self.ensembling,
                        "compare": self.compare,
                        "compare_args": list(self.compare_args)},
            "slurm": slurm,
        }


_HEADER = """\
# l1dfl experiment: the declared experiment and the record of what was run (docs/experiment.md).
# Job graph: preprocess (skipped when done) -> one nnUNetv2_train per trainer x configuration x fold -> collect.
# Scripts, logs, job records and the report go into the folder {folder}/ beside this file.
"""


def save(experiment: Experiment) -> None:
    """Write the experiment to its TOML file (atomically)."""
    import tomli_w

    text = _HEADER.format(folder=experiment.folder.name) + "\n" + tomli_w.dumps(experiment.to_toml())
    experiment.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = experiment.path.with_name(experiment.path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(experiment.path)


_KNOWN = {
    "experiment": {"dataset", "configurations", "plans", "trainers", "folds", "device", "npz", "num_gpus"},
    "paths": {"nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "trainer_folders"},
    "preprocess": {"allowed", "num_processes", "verify_dataset_integrity"},
    "collect": {"find_best_configuration", "ensembling", "compare", "compare_args"},
    "slurm": set(SlurmOptions.__dataclass_fields__),
}

_TYPES: dict[tuple[str, str], type | tuple[type, ...]] = {
    ("experiment", "dataset"): int, ("experiment", "configurations"): list, ("experiment", "plans"): str,
    ("experiment", "trainers"): list, ("experiment", "folds"): list, ("experiment", "device"): str,
    ("experiment", "npz"): bool, ("experiment", "num_gpus"): int,
    ("paths", "nnUNet_raw"): str, ("paths", "nnUNet_preprocessed"): str, ("paths", "nnUNet_results"): str,
    ("paths", "trainer_folders"): list,
    ("preprocess", "allowed"): bool, ("preprocess", "num_processes"): int,
    ("preprocess", "verify_dataset_integrity"): bool,
    ("collect", "find_best_configuration"): bool, ("collect", "compare"): bool, ("collect", "ensembling"): bool, ("collect", "compare_args"): list,
    ("slurm", "partition"): str, ("slurm", "account"): str, ("slurm", "time"): str, ("slurm", "gres"): str,
    ("slurm", "cpus_per_task"): int, ("slurm", "mem"): str, ("slurm", "sbatch_args"): list,
    ("slurm", "allow_local_paths"): bool, ("slurm", "requeue_on_timeout"): bool,
}


def load(path: str | Path) -> Experiment:
    """Read and validate EXPERIMENT.toml; raises ExperimentError with the file and key on bad content."""
    path = Path(path).absolute()
    if not path.is_file():
        raise ExperimentError(f"{path}: no such experiment file (write one with 'l1dfl experiment init')")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{path}: not valid TOML: {e}") from e
    for section, values in data.items():
        if section not in _KNOWN or not isinstance(values, dict):
            raise ExperimentError(f"{path}: unknown section [{section}]; known: {sorted(_KNOWN)}")
        for key, value in values.items():
            if key not in _KNOWN[section]:
                raise ExperimentError(f"{path}: [{section}] unknown key {key!r}; known: {sorted(_KNOWN[section])}")
            expected = _TYPES[(section, key)]
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ExperimentError(f"{path}: [{section}] {key} must be a {getattr(expected, '__name__', expected)},"
                                      f" got {value!r}")
    exp_section = data.get("experiment", {})
    for key in ("dataset", "trainers"):
        if key not in exp_section:
            raise ExperimentError(f"{path}: [experiment] {key} is missing")

    def as_path(value: str) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (path.parent / p)

    def str_list(section: str, key: str, items: list) -> list[str]:
        if not all(isinstance(i, str) for i in items):
            raise ExperimentError(f"{path}: [{section}] {key} must be a list of strings, got {items!r}")
        return list(items)

    paths = data.get("paths", {})
    pre = data.get("preprocess", {})
    col = data.get("collect", {})
    folds = exp_section.get("folds", [0, 1, 2, 3, 4])
    if not all(isinstance(f, int) and not isinstance(f, bool) for f in folds):
        raise ExperimentError(f"{path}: [experiment] folds must be a list of integers, got {folds!r}")
    slurm_values = dict(data.get("slurm", {}))
    if "sbatch_args" in slurm_values:
        slurm_values["sbatch_args"] = str_list("slurm", "sbatch_args", slurm_values["sbatch_args"])
    experiment = Experiment(
        path=path,
        dataset=exp_section["dataset"],
        trainers=str_list("experiment", "trainers", exp_section["trainers"]),
        configurations=str_list("experiment", "configurations", exp_section.get("configurations", ["3d_fullres"])),
        plans=exp_section.get("plans", "nnUNetPlans"),
        folds=list(folds),
        device=exp_section.get("device", "cuda"),
        npz=exp_section.get("npz", True),
        num_gpus=exp_section.get("num_gpus", 1),
        nnunet_raw=as_path(paths.get("nnUNet_raw", "")),
        nnunet_preprocessed=as_path(paths.get("nnUNet_preprocessed", "")),
        nnunet_results=as_path(paths.get("nnUNet_results", "")),
        trainer_folders=[as_path(p) for p in str_list("paths", "trainer_folders", paths.get("trainer_folders", []))
                         if p],
        preprocess_allowed=pre.get("allowed", True),
        preprocess_processes=pre.get("num_processes", 4),
        verify_dataset_integrity=pre.get("verify_dataset_integrity", True),
        find_best_configuration=col.get("find_best_configuration", True),
        ensembling=col.get("ensembling", True),
        compare=col.get("compare", True),
        compare_args=str_list("collect", "compare_args", col.get("compare_args", [])),
        slurm=SlurmOptions(**slurm_values),
    )
    experiment.validate()
    return experiment
