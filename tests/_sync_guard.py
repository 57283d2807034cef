"""A dispatch mode that records the ATen operators which make the host wait for a CUDA device.

``torch.cuda.set_sync_debug_mode("error")`` is the real check, but it needs a GPU; CI has none.
The operators that force a device-to-host synchronization are known by name, whatever the device
(a value read back to Python, an output whose size depends on the data, a boolean mask index), so
watching which operators the loss dispatches catches the same mistakes on CPU tensors.
What this cannot see: explicit copies to the host (``.cpu()`` is a no-op on CPU tensors) and
``torch.cuda.synchronize``; ``l1dfl bench --verify-cuda`` covers those on a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators that synchronize on CUDA: a scalar read back (``.item()``, ``bool(t)``, ``int(t)``),
#: outputs whose size depends on the values, or a result the host must inspect.
SYNCING_OPERATORS = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::histc",
    "aten::equal",
    "aten::allclose",
}


def _has_bool_index(args) -> bool:
    """``index`` / ``index_put`` with a boolean mask: the kernel runs ``nonzero`` on the mask."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostSyncGuard(TorchDispatchMode):
    """Records every dispatched operator that would make the host wait for a CUDA device.

    Usage: ``with HostSyncGuard() as guard: ...`` then ``assert not guard.syncs, guard.syncs``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen += 1
        name = func._schema.name
        if name in SYNCING_OPERATORS:
            self.syncs.append(str(func))
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            if _has_bool_index(args):
                self.syncs.append(f"{func} with a boolean mask")
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            self.syncs.append(f"{func} without output_size")
        return func(*args, **kwargs)
