"""The process group: joined under a launcher (deepspeed, torchrun), a group of one without.

Training (train/ds.py) and DeepSpeed-Inference serving (serving/engines.py) both need a group;
this is the one place that makes it. Also `free_port()`, for groups and servers on loopback.
Imports torch and DeepSpeed only when a group is made.
"""
from __future__ import annotations

import os
import socket

SOLO_MARKER = "RLHF_SOLO_GROUP_PID"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join (or, without a launcher, start) the process group; returns (rank, world size)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from core.hardware import hardware

    # A plain `python -m train ...`: a group of one. The variables we set are inherited by any
    # process this one starts (a server, a run from the app); the marker tells such a child that
    # they are its parent's solo group, not a launcher's, so it makes its own (fresh port).
    inherited_solo = os.environ.get(SOLO_MARKER, str(os.getpid())) != str(os.getpid())
    if "RANK" not in os.environ or (inherited_solo and os.environ.get("WORLD_SIZE") == "1"):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()), **{SOLO_MARKER: str(os.getpid())})
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False)
    if hardware().device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
