"""Reading source images (NIfTI, MHA, NRRD, ...) for the converters and ``l1dfl compare``.

SimpleITK reads a truncated ``.nii.gz`` or ``.nii`` as if it were complete (the missing voxels
become 0) and its NIfTI reader turns NaN and inf into 0, so neither a cut-off download nor a
corrupt PET would be noticed. :func:`read_image` therefore checks NIfTI files itself before
SimpleITK reads them: the whole gzip stream is decompressed (its end-of-stream marker and CRC
checked), the header (nibabel, NIfTI-1 or -2) says how many bytes of voxel data must follow, and
floating-point voxel data is scanned for NaN / inf in the stored values, which nibabel keeps. For
other formats the image SimpleITK returns is scanned for non-finite values.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnunetv2_l1dfl.conversion.errors import ConversionError

if TYPE_CHECKING:
    import SimpleITK as sitk

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CHUNK_BYTES = 1 << 22


def _decompressed_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes, gunzipped for ``.gz`` (the whole stream); '' or why it is truncated/corrupt."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if not path.name.lower().endswith(".gz") or magic != b"\x1f\x8b":  # a '.gz' not compressed: read as is
        return path.read_bytes(), ""
    out = bytearray()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                out += chunk
    except (EOFError, OSError, zlib.error) as e:  # EOFError: stream ends before its end-of-stream marker
        return bytes(out), (
            f"truncated or corrupt gzip stream after {len(out)} decompressed bytes ({type(e).__name__}: {e})"
        )
    return bytes(out), ""


def _nifti_header(data: bytes) -> Any:
    import nibabel as nib

    if len(data) < 348:
        raise ValueError(f"{len(data)} bytes, shorter than a NIfTI-1 header (348)")
    sizeof_hdr = int.from_bytes(data[:4], "little")
    if sizeof_hdr not in (348, 540):
        sizeof_hdr = int.from_bytes(data[:4], "big")
    header_class = nib.Nifti2Header if sizeof_hdr == 540 else nib.Nifti1Header
    return header_class.from_fileobj(io.BytesIO(data[: max(sizeof_hdr, 348)]), check=False)


def _first_index(mask: np.ndarray, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Voxel index (x, y, z, ...) of the first True of a flat, Fortran-ordered (NIfTI) mask."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), shape, order="F"))


def nifti_problem(path: Path | str) -> str:
    """'' when a ``.nii`` / ``.nii.gz`` file is complete and finite, else the one-line reason.

    Checks: the gzip stream decompresses to its end-of-stream marker with a valid CRC; the header
    parses; the file holds at least ``vox_offset + prod(dim) * bitpix / 8`` bytes (SimpleITK would
    fill the rest with zeros); floating-point voxels (as stored, before scl_slope/scl_inter) and a
    used scl_slope / scl_inter are finite. Reads the whole file (decompressed) into memory once.
    """
    path = Path(path)
    data, problem = _decompressed_bytes(path)
    if problem:
        return problem
    try:
        header = _nifti_header(data)
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as e:  # nibabel raises several types on a broken header
        return f"not a readable NIfTI header ({type(e).__name__}: {e})"
    count = int(np.prod(shape)) if shape else 0
    needed = offset + count * dtype.itemsize
    if len(data) < needed:
        return (
            f"truncated: the header (dim {shape}, {dtype.name}, data at byte {offset}) needs {needed} bytes, "
            f"the {'decompressed ' if path.name.lower().endswith('.gz') else ''}file has {len(data)}"
        )
    if dtype.kind in "fc":
        values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        finite = np.isfinite(values)
        if not finite.all():
            bad = ~finite
            n_nan = int(np.isnan(values).sum())
            return (
                f"{int(bad.sum())} non-finite voxel(s) ({n_nan} NaN, {int(bad.sum()) - n_nan} inf), the first at "
                f"voxel {_first_index(bad, shape)}"
            )
    try:
        slope, intercept = header.get_slope_inter()  # (None, None): no scaling (scl_slope 0 or NaN)
    except Exception as e:
        return f"invalid scl_slope / scl_inter ({type(e).__name__}: {e})"
    if slope is not None and not (np.isfinite(slope) and np.isfinite(intercept or 0.0)):
        return f"non-finite scl_slope {slope} / scl_inter {intercept}"
    return ""


def image_file_problem(path: Path | str) -> str:
    """'' when ``path`` can be read whole, else why not (for callers with their own reader).

    NIfTI files get the checks of :func:`nifti_problem`; other formats only the existence check
    here (their non-finite check needs the decoded image, see :func:`read_image`).
    """
    path = Path(path)
    if not path.is_file():
        return "file not found"
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return nifti_problem(path)
    return ""


def read_image(path: Path | str, what: str, case_id: str | None = None) -> sitk.Image:
    """Read a 3D scalar image (NIfTI, MHA, NRRD...) whole and finite, or raise :class:`ConversionError`.

    ``what`` names the image in messages ("PET", "mask", "prediction"), ``case_id`` the case
    (omitted from the message when None); every message names the file. Refused: a missing or
    unreadable file, a truncated or corrupt file (NIfTI: gzip stream, data size against the
    header), NaN or inf voxels (which SimpleITK's NIfTI reader would silently turn into 0), and
    anything but a 3D single-component image (a 4D image with one time point is reduced to 3D).
    """
    import SimpleITK as sitk

    path = Path(path)
    where = f"case {case_id}: " if case_id is not None else ""
    problem = image_file_problem(path)
    if problem == "file not found":
        raise ConversionError(f"{where}{what} file not found: {path}")
    if problem:
        raise ConversionError(f"{where}{what} {path}: {problem}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ConversionError(f"{where}cannot read {what} {path}: {str(e).strip().splitlines()[-1]}") from e
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:  # some writers add a singleton time axis
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{where}{what} {path} is not a 3D scalar image (size {image.GetSize()})")
    if not path.name.lower().endswith(NIFTI_SUFFIXES) and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0][::-1])
            raise ConversionError(
                f"{where}{what} {path}: {int(bad.sum())} non-finite voxel(s) (NaN or inf), the first at voxel {first}"
            )
    return image
