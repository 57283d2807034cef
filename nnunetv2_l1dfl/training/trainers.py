"""nnU-Net v2 trainers that differ from the stock ``nnUNetTrainer`` only in the loss.

- ``nnUNetTrainerL1DFL``: L1DFL with the paper's defaults (gamma 2, bin width 0.1).
- ``nnUNetTrainerL1DFL_gamma{1,2,5}_bw{0p05,0p1,0p2}``: the paper's sensitivity grid.
- ``nnUNetTrainerDiceFocal``: the paper's DFL baseline (plain squared Dice + the same focal term).
- ``nnUNetTrainerSquaredDice``: the paper's DL baseline (plain squared Dice alone). nnU-Net's own
  ``nnUNetTrainerDiceLoss`` is a different Dice (linear denominator, no background, smoothing 1e-5).
- ``nnUNetTrainerL1DFL_{N}epochs``, ``nnUNetTrainerDiceFocal_{N}epochs`` and
  ``nnUNetTrainerSquaredDice_{N}epochs``: training-length variants with the epoch counts of
  nnU-Net's own ``nnUNetTrainer_Xepochs``.

Network, plans, preprocessing, augmentation, optimizer, schedule and cross-validation are nnU-Net's.
The loss sees nnU-Net's label manager (ignore label, region-based training) and DDP state; deep
supervision is weighted exactly as the stock trainer does (:func:`wrap_deep_supervision`).

nnU-Net finds these classes by name through ``nnUNet_extTrainer`` (set up at interpreter start by
the package's ``.pth`` hook; see ``nnunetv2_l1dfl/nnunet_trainers``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from torch import nn

MINIMUM_NNUNETV2 = (2, 8, 0)


def _check_nnunetv2_version() -> None:
    """Fail early, with what to do, on an nnunetv2 too old for ``nnUNet_extTrainer`` discovery."""
    try:
        installed = version("nnunetv2")
    except PackageNotFoundError as e:
        raise ImportError("nnunetv2 is not installed: pip install 'nnunetv2>=2.8.0'") from e
    parts = []
    for piece in installed.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts + [0] * (3 - len(parts))) < MINIMUM_NNUNETV2:
        raise ImportError(
            f"nnunetv2 {installed} is installed but nnunetv2-l1dfl needs nnunetv2 >= 2.8.0 (trainer lookup "
            "through nnUNet_extTrainer). Upgrade with: pip install -U 'nnunetv2>=2.8.0'"
        )


_check_nnunetv2_version()

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss, bins_per_unit  # noqa: E402

#: Epoch counts of nnU-Net's ``nnUNetTrainer_Xepochs`` variants, mirrored for our trainers.
EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)
#: The paper's sensitivity grid.
GAMMA_GRID = (1.0, 2.0, 5.0)
BIN_WIDTH_GRID = (0.05, 0.1, 0.2)


def deep_supervision_weights(trainer: nnUNetTrainer) -> np.ndarray:
    """Weights of the deep-supervision outputs exactly as ``nnUNetTrainer._build_loss`` sets them.

    ``1 / 2**i`` per scale, the lowest resolution 0 (1e-6 under DDP without torch.compile, where a
    zero weight makes DDP complain about unused parameters), normalized to sum to 1.
    """
    scales = trainer._get_deep_supervision_scales()
    weights = np.array([1 / (2**i) for i in range(len(scales))])
    if trainer.is_ddp and not trainer._do_i_compile():
        weights[-1] = 1e-6
    else:
        weights[-1] = 0
    return weights / weights.sum()


def wrap_deep_supervision(trainer: nnUNetTrainer, loss: nn.Module) -> nn.Module:
    """Wrap ``loss`` in nnU-Net's DeepSupervisionWrapper when the trainer uses deep supervision.

    Each output scale gets its own loss call, hence its own difficulty histogram.
    """
    if not trainer.enable_deep_supervision:
        return loss
    return DeepSupervisionWrapper(loss, deep_supervision_weights(trainer))


class nnUNetTrainerL1DFL(nnUNetTrainer):
    """``nnUNetTrainer`` with the L1-weighted Dice Focal Loss (gamma 2, bin width 0.1).

    Class attributes select the loss; subclasses change only these:

    - ``l1dfl_gamma``, ``l1dfl_bin_width``: the loss hyperparameters;
    - ``l1dfl_weighted``: False gives the DFL baseline;
    - ``l1dfl_focal``: False leaves the focal term out (with ``l1dfl_weighted`` False: the DL baseline);
    - ``l1dfl_batch_dice``: False (default) computes Dice per sample and class, as the method
      does; None follows the plans' ``batch_dice`` like nnU-Net's own Dice; True forces batch Dice;
    - ``fixed_num_epochs``: overrides ``num_epochs`` (training-length variants).
    """

    l1dfl_gamma: float = 2.0
    l1dfl_bin_width: float = 0.1
    l1dfl_weighted: bool = True
    l1dfl_focal: bool = True
    l1dfl_batch_dice: bool | None = False
    fixed_num_epochs: int | None = None

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        self.validate_l1dfl_attributes()  # before nnU-Net sets anything up: a typo fails at once
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.fixed_num_epochs is not None:
            self.num_epochs = self.fixed_num_epochs

    @classmethod
    def validate_l1dfl_attributes(cls) -> None:
        """Raise a ValueError naming the attribute when a subclass sets one of the class attributes
        above to a value of the wrong kind (``fixed_num_epochs = 0``, ``l1dfl_batch_dice = "no"``, ...)."""
        def fail(attribute: str, expected: str) -> None:
            value = getattr(cls, attribute)
            raise ValueError(f"{cls.__name__}.{attribute} must be {expected}, got {value!r} ({type(value).__name__})")

        epochs = cls.fixed_num_epochs
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1):
            fail("fixed_num_epochs", "None or a positive int")
        if cls.l1dfl_batch_dice is not None and not isinstance(cls.l1dfl_batch_dice, (bool, np.bool_)):
            fail("l1dfl_batch_dice", "True, False or None (follow the plans' batch_dice)")
        for attribute in ("l1dfl_weighted", "l1dfl_focal"):
            if not isinstance(getattr(cls, attribute), (bool, np.bool_)):
                fail(attribute, "True or False")
        gamma = cls.l1dfl_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.integer, np.floating)) \
                or not np.isfinite(gamma) or gamma < 0:
            fail("l1dfl_gamma", "a finite number >= 0 (paper: 1, 2 or 5)")
        try:
            bins_per_unit(cls.l1dfl_bin_width)
        except ValueError as e:
            raise ValueError(f"{cls.__name__}.l1dfl_bin_width: {e}") from None

    def _build_loss(self) -> nn.Module:
        batch_dice = self.configuration_manager.batch_dice if self.l1dfl_batch_dice is None else self.l1dfl_batch_dice
        loss = L1DFLLoss(
            bin_width=self.l1dfl_bin_width,
            gamma=self.l1dfl_gamma,
            ignore_label=self.label_manager.ignore_label,
            regions=self.label_manager.has_regions,
            batch_dice=batch_dice,
            ddp=self.is_ddp,
            weighted=self.l1dfl_weighted,
            focal=self.l1dfl_focal,
        )
        name = {
            (True, True): "L1DFL",
            (False, True): "DiceFocal (DFL baseline: squared Dice + focal, unweighted)",
            (False, False): "SquaredDice (DL baseline: squared Dice alone, unweighted)",
            (True, False): "L1-weighted Dice alone (no focal term)",
        }[(self.l1dfl_weighted, self.l1dfl_focal)]
        self.print_to_log_file(f"Loss: {name}: {loss.extra_repr()}")
        return wrap_deep_supervision(self, loss)


class nnUNetTrainerDiceFocal(nnUNetTrainerL1DFL):
    """The paper's DFL baseline: plain squared-denominator Dice + the same focal term (gamma 2)."""

    l1dfl_weighted = False


class nnUNetTrainerSquaredDice(nnUNetTrainerL1DFL):
    """The paper's DL baseline: plain squared-denominator Dice alone, background included."""

    l1dfl_weighted = False
    l1dfl_focal = False


def _width_tag(bin_width: float) -> str:
    return f"{bin_width:g}".replace(".", "p")


def _define(name: str, base: type, doc: str, **attributes) -> type:
    """Create a trainer subclass that only sets class attributes, and export it under ``name``."""
    cls = type(name, (base,), {"__doc__": doc, "__module__": __name__, **attributes})
    globals()[name] = cls
    return cls


#: Every trainer name this package provides (the README lists them).
TRAINER_NAMES: list[str] = ["nnUNetTrainerL1DFL", "nnUNetTrainerDiceFocal", "nnUNetTrainerSquaredDice"]

for _gamma in GAMMA_GRID:
    for _width in BIN_WIDTH_GRID:
        _name = f"nnUNetTrainerL1DFL_gamma{_gamma:g}_bw{_width_tag(_width)}"
        _define(_name, nnUNetTrainerL1DFL, f"L1DFL with gamma {_gamma:g}, bin width {_width:g}.",
                l1dfl_gamma=_gamma, l1dfl_bin_width=_width)
        TRAINER_NAMES.append(_name)

for _base in (nnUNetTrainerL1DFL, nnUNetTrainerDiceFocal, nnUNetTrainerSquaredDice):
    for _epochs in EPOCH_VARIANTS:
        _name = f"{_base.__name__}_{_epochs}epochs"
        _define(_name, _base, f"{_base.__name__} trained for {_epochs} epochs.", fixed_num_epochs=_epochs)
        TRAINER_NAMES.append(_name)

__all__ = list(TRAINER_NAMES)
