"""Fixtures shared by every test module.

The IBSI SUV digital reference objects live in ``../shared/data/ibsi_suv_dro`` next to the
checkout (CC BY 4.0; never copied into the repository). Tests that need them skip with the reason
when that folder is absent, e.g. in a user's clone. ``L1DFL_SHARED_DIR`` points elsewhere.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("L1DFL_SHARED_DIR", REPO_ROOT.parent / "shared"))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most 4 (each end-to-end test trains with torch's threads)."""
    return max(1, min(os.cpu_count() or 1, 4))


#: The end-to-end files, longest first (each 3-6 minutes on a 2-core machine; docs/performance.md).
#: With ``--no-loadscope-reorder`` (pyproject.toml) xdist hands files to workers in collection order,
#: so these start first and the many short files fill the gaps instead of one long file running alone
#: at the end.
LONG_FILES = ("test_predict.py", "test_experiment.py", "test_nnunet_integration.py", "test_demo.py",
              "test_experiment_slurm.py", "test_conversion_dicom.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long end-to-end files first, so that parallel workers do not wait for one at the end."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ibsi_dro_dir() -> Path:
    folder = SHARED_DIR / "data" / "ibsi_suv_dro"
    if not folder.is_dir():
        pytest.skip(
            f"IBSI SUV DROs not found at {folder}: they ship beside the project checkout in "
            "../shared/data/ibsi_suv_dro (set L1DFL_SHARED_DIR to the folder holding data/)"
        )
    return folder


@pytest.fixture
def nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Point nnU-Net's three folders at fresh temporary folders; returns them as a dict."""
    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
        paths[name] = str(folder)
    return paths
