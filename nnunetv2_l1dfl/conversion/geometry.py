"""Comparing and describing image grids (size, spacing, origin, direction) of SimpleITK images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_l1dfl.conversion.errors import ConversionError

if TYPE_CHECKING:
    import SimpleITK as sitk

# NIfTI stores geometry as float32, so headers agree to ~1e-5 mm when they agree at all.
GEOMETRY_ATOL = 1e-4


def describe_geometry(image: sitk.Image) -> str:
    return (
        f"size {tuple(image.GetSize())}, spacing {tuple(round(s, 5) for s in image.GetSpacing())} mm, "
        f"origin {tuple(round(o, 4) for o in image.GetOrigin())} mm, "
        f"direction {tuple(round(d, 4) for d in image.GetDirection())}"
    )


def geometry_mismatch(image: sitk.Image, reference: sitk.Image, atol: float = GEOMETRY_ATOL) -> str | None:
    """``None`` when both share size, spacing, origin and direction (within ``atol``), else what differs."""
    if tuple(image.GetSize()) != tuple(reference.GetSize()):
        return f"size {tuple(image.GetSize())} != {tuple(reference.GetSize())}"
    for what, a, b in (
        ("spacing", image.GetSpacing(), reference.GetSpacing()),
        ("origin", image.GetOrigin(), reference.GetOrigin()),
        ("direction", image.GetDirection(), reference.GetDirection()),
    ):
        if not np.allclose(a, b, rtol=0, atol=atol):
            return f"{what} {tuple(round(v, 5) for v in a)} != {tuple(round(v, 5) for v in b)}"
    return None


def snap_to_grid(
    image: sitk.Image, reference: sitk.Image, what: str, case_id: str, atol_mm: float = 1e-2
) -> sitk.Image:
    """``image`` with ``reference``'s geometry copied over, when the two grids are the same up to
    ``atol_mm`` of rounding (files written by different tools); else a :class:`ConversionError`.

    Use this for inputs that are meant to be on the PET grid already (autoPET ``CTres``); resample
    everything else.
    """
    problem = geometry_mismatch(image, reference, atol=atol_mm)
    if problem:
        raise ConversionError(f"case {case_id}: {what} is not on the PET grid ({problem})")
    import SimpleITK as sitk

    snapped = sitk.Image(image)
    snapped.CopyInformation(reference)
    return snapped

