"""nnunetv2-l1dfl: the L1-weighted Dice Focal Loss (Dzikunu et al.) for nnU-Net v2.

Attributes are imported lazily: Python imports this package at every interpreter start (the
trainer-discovery hook in ``nnunetv2_l1dfl.pth``), so importing it must not pull in torch.

    from nnunetv2_l1dfl import L1DFLLoss, DiceFocalLoss, SquaredDiceLoss
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "L1DFLLoss": "nnunetv2_l1dfl.losses.l1dfl",
    "DiceFocalLoss": "nnunetv2_l1dfl.losses.l1dfl",
    "SquaredDiceLoss": "nnunetv2_l1dfl.losses.l1dfl",
}

__all__ = ["L1DFLLoss", "DiceFocalLoss", "SquaredDiceLoss", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nnunetv2_l1dfl' has no attribute {name!r}")
