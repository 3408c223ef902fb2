"""bench/gpu/check.sh on a machine without a CUDA GPU: one sentence, status 0, nothing written
(on a GPU it runs every CUDA path, minutes: not a test)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_without_a_gpu_the_check_says_so_in_one_sentence_and_writes_nothing():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: bench/gpu/check.sh would run the whole check")
    readme = ROOT / "bench" / "gpu" / "README.md"
    before = readme.read_text() if readme.exists() else None
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench/gpu/check.sh needs a CUDA GPU") and "Traceback" not in done.stderr
    assert (readme.read_text() if readme.exists() else None) == before
