"""Short training schedules for the demo and the tests, the way nnU-Net users make them.

nnU-Net looks trainers up by name in fresh processes (training, prediction, validation), so a
custom schedule is a trainer subclass in a folder listed in ``nnUNet_extTrainer``.
:func:`write_schedule_trainers` writes such a module; the caller passes ``nnUNet_extTrainer=<folder>``
to its nnU-Net subprocesses (this package's own trainer folder is appended at interpreter start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Trainers a schedule can be derived from, and the module each lives in.
BASE_TRAINER_MODULES = {
    "nnUNetTrainer": "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnUNetTrainerDiceLoss": "nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerDiceLoss",
    "nnUNetTrainerL1DFL": "nnunetv2_l1dfl.training.trainers",
    "nnUNetTrainerDiceFocal": "nnunetv2_l1dfl.training.trainers",
    "nnUNetTrainerSquaredDice": "nnunetv2_l1dfl.training.trainers",
}

_CLASS_TEMPLATE = '''

class {name}({base}):
    """{base} for {num_epochs} epoch(s) of {iterations_per_epoch} iteration(s), {val_iterations} validation iteration(s)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {num_epochs}
        self.num_iterations_per_epoch = {iterations_per_epoch}
        self.num_val_iterations_per_epoch = {val_iterations}{extra}
'''

_PLOT_TEMPLATE = """
        plot_progress_every(self, {every})"""


def plot_progress_every(trainer: Any, every: int) -> None:
    """Make ``trainer`` draw nnU-Net's ``progress.png`` only every ``every`` epochs and at its last epoch.

    nnU-Net's ``on_epoch_end`` redraws the whole figure after every epoch; with epochs of a few
    seconds (the CPU demo) that is about a sixth of the training time. The logged values are unchanged
    and the final figure shows every epoch. Call after ``nnUNetTrainer.__init__`` (it wraps the
    logger's ``plot_progress_png``; ``load_checkpoint`` keeps the logger object, so a continued
    training keeps the rule).
    """
    if int(every) < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    draw = trainer.logger.plot_progress_png

    def plot_progress_png(output_folder: str) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % int(every) == 0 or epoch + 1 >= trainer.num_epochs:
            draw(output_folder)

    trainer.logger.plot_progress_png = plot_progress_png


def write_schedule_trainers(
    folder: str | Path,
    *,
    num_epochs: int,
    iterations_per_epoch: int,
    val_iterations: int,
    suffix: str = "demo",
    bases: tuple[str, ...] = ("nnUNetTrainer", "nnUNetTrainerL1DFL"),
    oversample_foreground: float | None = None,
    plot_every: int = 1,
) -> dict[str, str]:
    """Write ``<folder>/l1dfl_schedule_trainers_<suffix>.py`` with one short-schedule subclass per base.

    ``oversample_foreground`` sets nnU-Net's ``oversample_foreground_percent`` (the share of each
    batch whose patch is centred on a foreground voxel; nnU-Net's default 0.33 when None) in every
    subclass alike. ``plot_every`` > 1 draws nnU-Net's ``progress.png`` only every that many epochs
    and at the last one (drawing it costs about 1.4 s per epoch on a 2-core CPU; see
    :func:`plot_progress_every`). Returns base name -> new trainer name (``<base>_<suffix>``). Raises ValueError
    for an unknown base, a non-identifier suffix, counts < 1 or an oversampling outside [0, 1].
    Overwrites only its own module file.
    """
    if not suffix.isidentifier():
        raise ValueError(f"suffix must be a Python identifier, got {suffix!r}")
    for label, value in (("num_epochs", num_epochs), ("iterations_per_epoch", iterations_per_epoch),
                         ("val_iterations", val_iterations)):
        if int(value) < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    extra = ""
    if oversample_foreground is not None:
        value = float(oversample_foreground)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"oversample_foreground must lie in [0, 1], got {oversample_foreground}")
        extra = f"\n        self.oversample_foreground_percent = {value!r}"
    if int(plot_every) < 1:
        raise ValueError(f"plot_every must be >= 1, got {plot_every}")
    if int(plot_every) > 1:
        extra += _PLOT_TEMPLATE.format(every=int(plot_every))
    unknown = [b for b in bases if b not in BASE_TRAINER_MODULES]
    if unknown:
        raise ValueError(f"unknown base trainer(s) {unknown}; choose from {sorted(BASE_TRAINER_MODULES)}")

    lines = [f'"""Short-schedule trainers written by nnunetv2_l1dfl.training.schedules (suffix {suffix!r})."""', "",
             "import torch", ""]
    if int(plot_every) > 1:
        lines += ["from nnunetv2_l1dfl.training.schedules import plot_progress_every", ""]
    for base in bases:
        lines.append(f"from {BASE_TRAINER_MODULES[base]} import {base}")
    names = {}
    for base in bases:
        name = f"{base}_{suffix}"
        names[base] = name
        lines.append(_CLASS_TEMPLATE.format(name=name, base=base, num_epochs=int(num_epochs),
                                            iterations_per_epoch=int(iterations_per_epoch),
                                            val_iterations=int(val_iterations), extra=extra).rstrip("\n"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"l1dfl_schedule_trainers_{suffix}.py"
    tmp = target.with_suffix(".py.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(target)
    return names
