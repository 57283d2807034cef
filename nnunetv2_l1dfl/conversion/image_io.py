"""Reading source images (NIfTI, MHA, NRRD, ...) for the converters, with errors naming case and file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nnunetv2_l1dfl.conversion.errors import ConversionError

if TYPE_CHECKING:
    import SimpleITK as sitk


def read_image(path: Path, what: str, case_id: str) -> sitk.Image:
    """Read a 3D image (NIfTI, MHA, NRRD...) or raise a :class:`ConversionError` naming the case and file."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"case {case_id}: {what} file not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ConversionError(
            f"case {case_id}: cannot read {what} {path}: {str(e).strip().splitlines()[-1]}"
        ) from e
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:  # some writers add a singleton time axis
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(
            f"case {case_id}: {what} {path} is not a 3D scalar image (size {image.GetSize()})"
        )
    return image

