"""The Triton (CUDA) kernels, run by Triton's interpreter on CPU tensors, against the reference.

``TRITON_INTERPRET=1`` has to be set before the kernels are defined, so the check runs in a fresh
interpreter (``tests/_kernels_helpers.py triton``): softmax and regions, ignore label, float16 /
float32 / float64 logits, integer and non-integer gamma; statistics and gradient.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed (it ships with PyTorch's CUDA wheels)")


def test_triton_kernels_match_reference_in_interpreter(repo_root):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(repo_root / "tests" / "_kernels_helpers.py"), "triton"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 7, result.stdout
