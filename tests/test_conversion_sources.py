"""Converters on NIfTI sources that SimpleITK alone would read wrongly: truncated files and NaN voxels.

The autoPET converters (and HECKTOR, NIfTI folders, manifest masks of ``convert dicom``) read every
source with ``conversion.image_io.read_image``; a bad file fails its case by name, the others go on.
"""

from __future__ import annotations

import re

import _conversion_helpers as h
import nibabel as nib
import numpy as np

from nnunetv2_l1dfl.cli import main


def test_autopet_truncated_and_nan_sources_fail_their_case_by_name(tmp_path, capsys):
    source = h.make_autopet_iii(tmp_path / "download")
    cut_pet = source / "imagesTr" / "psma_95b833d46f153cd2_2018-04-16_0001.nii.gz"
    data = cut_pet.read_bytes()
    cut_pet.write_bytes(data[: int(len(data) * 0.9)])
    cut_label = source / "labelsTr" / "psma_95b833d46f153cd2_2019-02-01.nii.gz"
    data = cut_label.read_bytes()
    cut_label.write_bytes(data[:-8])  # only the gzip trailer (CRC, size) missing
    nan_pet = source / "imagesTr" / "psma_a1b2c3d4e5f60718_2017-11-30_0001.nii.gz"
    image = nib.load(str(nan_pet))
    suv = np.asanyarray(image.dataobj).astype(np.float32)
    suv[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(suv, image.affine, image.header), str(nan_pet))

    raw = tmp_path / "raw"
    assert main(["convert", "autopet", str(source), "-d", "224", "-n", "PSMA", "-o", str(raw), "--tracer", "psma",
                 "--no-progress"]) == 1  # fmt: skip
    captured = capsys.readouterr()
    err = captured.err
    assert re.search(rf"FAILED psma_95b833d46f153cd2_20180416: .*{re.escape(str(cut_pet))}: truncated or corrupt gzip", err), err
    assert re.search(rf"FAILED psma_95b833d46f153cd2_20190201: .*{re.escape(str(cut_label))}: truncated or corrupt gzip", err), err
    assert re.search(
        rf"FAILED psma_a1b2c3d4e5f60718_20171130: .*{re.escape(str(nan_pet))}: 1 non-finite voxel\(s\) \(1 NaN, 0 inf\), "
        r"the first at voxel \(3, 4, 5\)", err,
    ), err  # fmt: skip
    assert "0 converted" in captured.out
