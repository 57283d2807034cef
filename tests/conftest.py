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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow (end-to-end) tests first, so that parallel workers do not wait for one at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a file is kept


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
