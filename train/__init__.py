"""RLHF Studio's training library: SFT, reward model and PPO through DeepSpeed."""
import os

if "DS_ACCELERATOR" not in os.environ:
    # Settle DeepSpeed's accelerator before anything imports it (it warns when it has to guess).
    import torch

    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
