"""Trainer subclass attributes are validated before nnU-Net sets anything up, naming the attribute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_l1dfl.training import trainers
from nnunetv2_l1dfl.training.trainers import nnUNetTrainerL1DFL

BAD = [
    ("fixed_num_epochs", 0), ("fixed_num_epochs", -5), ("fixed_num_epochs", 2.5), ("fixed_num_epochs", True),
    ("fixed_num_epochs", "100"),
    ("l1dfl_batch_dice", "no"), ("l1dfl_batch_dice", 1), ("l1dfl_batch_dice", 0.0),
    ("l1dfl_weighted", None), ("l1dfl_weighted", "yes"), ("l1dfl_focal", 1),
    ("l1dfl_gamma", -1.0), ("l1dfl_gamma", float("nan")), ("l1dfl_gamma", "2"), ("l1dfl_gamma", True),
    ("l1dfl_bin_width", 0.3), ("l1dfl_bin_width", 0.0), ("l1dfl_bin_width", "0.1"),
]
GOOD = [
    ("fixed_num_epochs", None), ("fixed_num_epochs", 1), ("fixed_num_epochs", np.int64(250)),
    ("l1dfl_batch_dice", None), ("l1dfl_batch_dice", True), ("l1dfl_batch_dice", False),
    ("l1dfl_weighted", False), ("l1dfl_focal", False), ("l1dfl_gamma", 0), ("l1dfl_gamma", 5.0),
    ("l1dfl_bin_width", 0.05), ("l1dfl_bin_width", 0.2),
]


def _subclass(attribute, value):
    return type("nnUNetTrainerL1DFL_custom", (nnUNetTrainerL1DFL,), {attribute: value})


@pytest.mark.parametrize("attribute, value", BAD)
def test_bad_attribute_is_refused_naming_it(attribute, value):
    cls = _subclass(attribute, value)
    with pytest.raises(ValueError, match=rf"nnUNetTrainerL1DFL_custom\.{attribute}"):
        cls.validate_l1dfl_attributes()
    # the constructor checks first, before nnU-Net reads plans or dataset.json
    with pytest.raises(ValueError, match=rf"\.{attribute}"):
        cls({}, "3d_fullres", 0, {}, torch.device("cpu"))


@pytest.mark.parametrize("attribute, value", GOOD)
def test_good_attribute_is_accepted(attribute, value):
    _subclass(attribute, value).validate_l1dfl_attributes()


def test_every_provided_trainer_is_valid():
    for name in trainers.TRAINER_NAMES:
        getattr(trainers, name).validate_l1dfl_attributes()
