"""Where RLHF Studio keeps its files: `$RLHF_HOME` (default ~/.rlhf-studio), its model cache and
the runs folder. Torch-free: the ratings CLI and the chat server pool need these paths and
nothing of the training stack.

The runs folder (`RLHF_RUNS_DIR`, default `$RLHF_HOME/runs`) is where the app puts every run it
starts; the command line writes wherever `--output` names.
"""
from __future__ import annotations

import os
from pathlib import Path


def rlhf_home() -> Path:
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".rlhf-studio").expanduser()


def models_dir() -> Path:
    return rlhf_home() / "models"


def runs_dir() -> Path:
    return Path(os.environ.get("RLHF_RUNS_DIR") or rlhf_home() / "runs").expanduser().resolve()
