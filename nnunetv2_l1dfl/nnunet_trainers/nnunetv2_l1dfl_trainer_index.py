"""Index of nnunetv2-l1dfl trainers for nnU-Net's ``nnUNet_extTrainer`` lookup.

nnU-Net imports every module of this folder by its bare name and takes the first one that has an
attribute named like the requested trainer. The classes themselves live in
``nnunetv2_l1dfl.training.trainers``; re-exporting them here keeps one class object per trainer
(checkpoints and multiprocessing see ``nnunetv2_l1dfl.training.trainers.<Name>``).
"""

from nnunetv2_l1dfl.training.trainers import *  # noqa: F401,F403
