"""Installer for nnunetv2-l1dfl.

Besides the package, the install drops one line, ``nnunetv2_l1dfl.pth``, into site-packages. Python
runs it at interpreter start; it appends this package's trainer folder to ``nnUNet_extTrainer``
(keeping entries the user already has), so ``nnUNetv2_train ... -tr nnUNetTrainerL1DFL`` finds the
trainers with nothing exported by hand. ``pip uninstall nnunetv2-l1dfl`` removes it again.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PTH_FILE = "nnunetv2_l1dfl.pth"


class BuildPyWithTrainerHook(build_py):
    """build_py that also places the start-up hook at the root of site-packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join(HERE, PTH_FILE), os.path.join(self.build_lib, PTH_FILE))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_FILE)]


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="nnunetv2-l1dfl",
    version="0.1.0",
    description="L1-weighted Dice Focal Loss (L1DFL) for nnU-Net v2, PET/CT conversion and trainer comparison",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_l1dfl", "nnunetv2_l1dfl.*", "dataset_conversion"]),
    py_modules=["_nnunetv2_l1dfl_hook"],
    include_package_data=True,
    install_requires=[
        "nnunetv2>=2.8.0",
        "torch>=2.1",
        "batchgenerators>=0.25",
        "SimpleITK>=2.2",
        "numpy>=1.24",
        "numba>=0.58",
        "pydicom>=2.4",
        "nibabel>=5.0",
        "highdicom>=0.24",
        "scikit-image>=0.19",
        "connected-components-3d>=3.12",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "tomli-w>=1.0",
        "tomli>=1.1; python_version < '3.11'",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.8", "monai>=1.3", "ruff>=0.4", "pingouin>=0.5", "statsmodels>=0.14"],
    },
    entry_points={"console_scripts": ["l1dfl = nnunetv2_l1dfl.cli:main"]},
    cmdclass={"build_py": BuildPyWithTrainerHook},
)
