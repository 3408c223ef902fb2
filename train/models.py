"""The models training needs around a base model (core/models.py loads those): LoRA through
peft and merging it on save, the causal LM that returns what a training step needs, the
value-head model of the reward model and the critic, and saving a Hugging Face folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from core.models import ModelError, load_errors
from core.paths import temp_folder_beside
from train.losses import sequence_logprobs, sft_loss


# ---- LoRA -----------------------------------------------------------------------------------------

def add_lora(model, dim: int, alpha: float, dropout: float, targets: str, task: str = "CAUSAL_LM"):
    """Wrap `model` with LoRA adapters of rank `dim`; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules, task_type=task)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ModelError(f"--lora-targets {targets!r} does not match this model ({err}): use "
                         "all-linear or names such as q_proj,v_proj.") from None


def make_trainable(model, cfg, task: str = "CAUSAL_LM"):
    """Gradient checkpointing and LoRA as the step's config asks; returns the model to train."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora_dim:
        model = add_lora(model, cfg.lora_dim, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, task)
    return model


def lora_scaling(cfg) -> float | None:
    """The factor LoRA weights are merged with on save, or None without LoRA."""
    return cfg.lora_alpha / cfg.lora_dim if cfg.lora_dim else None


def merge_lora_state_dict(state_dict: dict, scaling: float) -> dict:
    """A peft state dict with LoRA factors folded in: plain base-model names and weights.

    W' = W + scaling * B @ A for every wrapped linear; works on a gathered (ZeRO-3) state dict,
    so no model object has to be materialised to merge.
    """
    prefix = "base_model.model."
    merged = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout" in key:
            continue
        plain = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in plain:
            module = key.rsplit(".base_layer.", 1)[0]
            param = key.rsplit(".base_layer.", 1)[1]
            plain = plain.replace(".base_layer.", ".")
            a = state_dict.get(f"{module}.lora_A.default.weight")
            b = state_dict.get(f"{module}.lora_B.default.weight")
            if param == "weight" and a is not None and b is not None:
                delta = (b.float() @ a.float()) * scaling
                value = (value.float() + delta).to(value.dtype)
        merged[plain] = value
    return merged


# ---- training wrappers ----------------------------------------------------------------------------

def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that start at 0 on each row's first real token (left padding too)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class CausalLMWithLoss(torch.nn.Module):
    """A causal LM whose forward returns what a training step needs, not full-vocabulary logits.

    With `labels`: (summed SFT loss, labelled-token count), or with `per_sequence` (B,) summed
    log-probs of each row's labelled tokens and (B,) their counts (DPO). With `response_start`: (B, R, V)
    logits of the positions that predict tokens response_start..T-1 (PPO's log-probs).
    DeepSpeed's engine wraps this module; decoder and head are the model's own submodules
    (LoRA layers included), so ZeRO-3's hooks see them, and weights sit under `lm.`.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels=None, response_start: int | None = None,
                per_sequence: bool = False):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=positions(attention_mask),
                                       use_cache=False).last_hidden_state
        head = self.lm.get_output_embeddings()
        if labels is not None:
            return (sequence_logprobs if per_sequence else sft_loss)(hidden, labels, head)
        return head(hidden[:, response_start - 1:-1])

    def generate(self, *args, **kwargs):
        """The LM's own `generate` (DeepSpeed's Hybrid Engine replaces this one with its own)."""
        return self.lm.generate(*args, **kwargs)


class ValueHeadModel(torch.nn.Module):
    """A transformer backbone with a scalar head: one value per position, shape (B, T).

    The reward model reads the value at each response's last token; PPO's critic reads every
    position. Saved as the backbone's Hugging Face folder plus `value_head.safetensors`.
    """

    def __init__(self, backbone, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.v_head = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.normal_(self.v_head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        self.offset = 0.0  # set by normalise_output; a float, so no precision or ZeRO touches it

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions(attention_mask), use_cache=False).last_hidden_state
        return self.v_head(hidden).squeeze(-1).float() - self.offset

    def normalise_output(self, mean: float, std: float) -> None:
        """Answer (value - mean) / std from now on. A critic that starts as the reward model
        then predicts the normalised scores PPO is paid in: with raw values, its error at the
        last token (the reward model's mean, a few units) would flow back through GAE as an
        advantage that grows towards each response's end, whatever the response."""
        with torch.no_grad():
            self.v_head.weight.div_(std)
        self.offset = mean / std


VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_STATS_FILE = "reward_stats.json"


def load_value_model(path: str, dtype=torch.float32) -> ValueHeadModel:
    """A value model from a reward-model folder, or a fresh head on any model's backbone."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    head = Path(path) / VALUE_HEAD_FILE
    try:
        backbone = AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
        model = ValueHeadModel(backbone, backbone.config.hidden_size).to(dtype)
        if head.is_file():
            model.v_head.weight.data.copy_(load_file(head)["weight"])
    except (*load_errors(), KeyError, RuntimeError) as err:
        raise ModelError(f"could not load model {path} ({str(err).splitlines()[0]}): pass a "
                         "reward-model folder (a run's final/), a model folder or 'default'.") from None
    return model


def reward_stats(path: str) -> dict | None:
    """The reward mean and std saved with a reward model (for PPO's normalisation), if any."""
    import json

    stats = Path(path) / REWARD_STATS_FILE
    return json.loads(stats.read_text()) if stats.is_file() else None


def unwrap(module):
    """The Hugging Face model inside our wrappers and peft (LoRA layers still injected)."""
    for inner in ("lm", "backbone"):
        if hasattr(module, inner):
            module = getattr(module, inner)
            break
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def save_hf(state_dict: dict, module, tokenizer, folder: Path, lora_scaling: float | None,
            extra_files: dict | None = None) -> None:
    """Write a Hugging Face folder (safetensors, config, tokenizer) from a full state dict.

    `state_dict` comes from the training engine (keys under `lm.` or `backbone.`, LoRA factors
    possibly present, `v_head.weight` for value models); LoRA is merged so the folder loads with
    plain `from_pretrained`; the value head goes to its own file. `extra_files` maps file names
    to text written beside. Written to a temporary folder first, so an interrupted save never
    leaves a half-written result.
    """
    from safetensors.torch import save_file

    head = state_dict.pop("v_head.weight", None)
    state_dict = {k.split(".", 1)[1] if k.startswith(("lm.", "backbone.")) else k: v
                  for k, v in state_dict.items()}
    if lora_scaling is not None:
        state_dict = merge_lora_state_dict(state_dict, lora_scaling)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_beside(folder)
    try:
        unwrap(module).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if head is not None:
            save_file({"weight": head.contiguous()}, tmp / VALUE_HEAD_FILE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if folder.is_symlink():  # the link goes, never what it points to
            folder.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

