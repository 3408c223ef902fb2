"""The one boundary to DeepSpeed: distributed setup, configs, engines, checkpoints, full weights.

On a CPU (DeepSpeed picks its CPU accelerator by itself) ranks talk over gloo and the optimizer
is torch's AdamW handed to DeepSpeed as a client optimizer, since DeepSpeed's fused and CPU Adam
kernels need a compiler step or CUDA; with offload, DeepSpeed keeps that optimizer's state in
CPU memory. On CUDA, DeepSpeed builds its own AdamW from the config.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import deepspeed
import torch

from core.distributed import init_distributed  # noqa: F401  (the steps start their group here)
from core.errors import UserError
from core.hardware import Precision, hardware, resolve_precision
from core.hardware import device as hardware_device


def precision(cfg) -> Precision:
    """What `cfg.precision` (auto, bf16, fp16, fp32) means on this machine, and why."""
    return resolve_precision(cfg.precision)


def on_cuda() -> bool:
    return hardware().device == "cuda"


def device() -> torch.device:
    return hardware_device()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(value: float) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.item()


def ds_config(cfg, *, train: bool = True, tensorboard_dir: str | None = None,
              learning_rate: float | None = None) -> dict:
    """The DeepSpeed JSON config for one engine, from the step's config."""
    zero = {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if cfg.offload and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": precision(cfg).name == "bf16"},
        "fp16": {"enabled": precision(cfg).name == "fp16", "loss_scale": 0},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train and on_cuda():
        lr = cfg.learning_rate if learning_rate is None else learning_rate
        config["optimizer"] = {"type": "AdamW", "params": {"lr": lr,
                               "weight_decay": cfg.weight_decay, "betas": [0.9, 0.95],
                               "torch_adam": not fused_adam_available()}}
    if tensorboard_dir:
        config["tensorboard"] = {"enabled": True, "output_path": tensorboard_dir, "job_name": "."}
    return config


def fused_adam_available() -> bool:
    """Whether DeepSpeed's fused Adam runs here: built at install, or buildable (a CUDA compiler).
    Without either it would fail at the first step; torch's AdamW takes its place."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(installed_ops.get("fused_adam")) or (
        CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists())


# --lr-scheduler -> transformers' name: every one warms up linearly from 0 first
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def lr_scheduler(optimizer, cfg, total_steps: int):
    """Linear warmup over warmup_ratio of `total_steps` optimizer steps, then the decay
    --lr-scheduler names (to 0 at `total_steps`), as transformers' `get_scheduler` makes it."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[cfg.lr_scheduler], optimizer,
                         num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as is usual for transformers."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; the scheduler must not see them


def initialize(model, cfg, total_steps: int, tensorboard_dir: str | None = None,
               learning_rate: float | None = None, extra: dict | None = None):
    """A DeepSpeed training engine with AdamW and a warmup-then-decay schedule.
    `learning_rate` overrides cfg's (PPO's critic); `extra` adds config sections."""
    config = {**ds_config(cfg, tensorboard_dir=tensorboard_dir, learning_rate=learning_rate),
              **(extra or {})}
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    if on_cuda():
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=config)
        engine.lr_scheduler = lr_scheduler(optimizer, cfg, total_steps)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr,
                                      betas=(0.9, 0.95))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=lr_scheduler(optimizer, cfg, total_steps),
                                               config=config)
    return engine


def inference_engine(model, cfg):
    """A frozen model placed as DeepSpeed would for inference in training (ZeRO-3 partitions it)."""
    config = ds_config(cfg, train=False)
    if cfg.zero_stage != 3:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


# ---- checkpoints and full weights ------------------------------------------------------------------

def save_checkpoint(engine, folder: Path, step: int, client_state: dict, keep: int) -> None:
    """A resumable checkpoint (module, optimizer, scheduler); only the newest `keep` stay."""
    tag = f"step-{step:08d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)
    barrier()
    if torch.distributed.get_rank() == 0:
        older = sorted(p for p in folder.glob("step-*") if p.is_dir() and p.name != tag)
        for stale in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)


class CheckpointError(UserError):
    """A run's checkpoint is missing or cannot be loaded."""


def load_checkpoint(engine, folder: Path) -> dict:
    """Restore the newest checkpoint in `folder` (the one `latest` names); its client state."""
    try:
        path, client_state = engine.load_checkpoint(str(folder))
        why = "" if path else "not found"
    except Exception as err:  # noqa: BLE001  DeepSpeed asserts (no message) on a folder without states
        path, client_state = None, None
        why = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if not path or not isinstance(client_state, dict):
        raise CheckpointError(f"the checkpoint in {folder} cannot be loaded ({why or 'no saved state'}): "
                              "restore it, or train from the start with --overwrite instead of "
                              "--resume (which deletes what the run wrote, any final/ included).")
    return client_state


def full_state_dict(engine) -> dict | None:
    """The whole module's weights on rank 0 (gathered under ZeRO-3); None on other ranks."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if torch.distributed.get_rank() == 0 else None
    if torch.distributed.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
