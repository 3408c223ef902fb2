"""Where RLHF Studio keeps its files: `$RLHF_HOME` (default ~/.rlhf-studio) and its models/ cache.

Torch-free on purpose: the ratings CLI and the chat server pool need these paths and nothing of
the training stack. Run folders are not here: they are whatever `--output` names (train/rundir.py).
"""
from __future__ import annotations

import os
from pathlib import Path


def rlhf_home() -> Path:
    return Path(os.environ.get("RLHF_HOME", Path.home() / ".rlhf-studio")).expanduser()


def models_dir() -> Path:
    return rlhf_home() / "models"
