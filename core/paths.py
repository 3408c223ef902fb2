"""Where RLHF Studio keeps its files: `$RLHF_HOME` (default ~/.rlhf-studio), its model cache and
the runs folder; and how a file or folder is replaced whole (`atomic_write`, `temp_folder_beside`).
Torch-free: the ratings CLI and the chat server pool need these paths and nothing of the
training stack.

The runs folder (`RLHF_RUNS_DIR`, default `$RLHF_HOME/runs`) is where the app puts every run it
starts; the command line writes wherever `--output` names.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager, suppress
from pathlib import Path


def rlhf_home() -> Path:
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".rlhf-studio").expanduser()


def models_dir() -> Path:
    return rlhf_home() / "models"


def runs_dir() -> Path:
    return Path(os.environ.get("RLHF_RUNS_DIR") or rlhf_home() / "runs").expanduser().resolve()


def outside_roots(name: str, roots: list[Path]) -> bool:
    """Whether a model name a request sent names a file or folder outside `roots` (links
    resolved): 'default' and hub names (anything that is neither there nor looks like a path)
    never do."""
    path = Path(name).expanduser()
    local = path.exists() or path.is_symlink() or name.startswith((".", "/", "~")) \
        or name.count("/") > 1 or name.endswith(".gguf")
    if name == "default" or not local:
        return False
    full = path.resolve()
    return not any(full.is_relative_to(root.resolve()) for root in roots)


def request_roots(extra: list[str] = ()) -> list[Path]:
    """The folders an inference server loads models from on request: the runs folder, the
    models folder and `extra` (its --load-from)."""
    return [runs_dir(), models_dir(), *(Path(p).expanduser() for p in extra)]


# ---- replacing a file or folder whole -------------------------------------------------------------
# The temporary name beside the target is random (48 bits: nobody can plant a link there in
# advance) and created exclusively (O_EXCL never opens an existing file nor follows a link),
# and it is removed on failure.

def _temp_name(path: Path) -> Path:
    # a short name (a long target name plus a suffix could pass the file-name limit)
    return path.with_name(f".{path.name[:64]}.{secrets.token_hex(6)}.tmp")


@contextmanager
def atomic_write(path: str | Path, replace: bool = True, encoding: str = "utf-8"):
    """A text handle on a new temporary file beside `path`; when the block ends without an
    error the file becomes `path` (readers see the old file or the new one, never half of
    one), otherwise it is removed and `path` is left as it was. With `replace=False` an
    existing `path` is never replaced: FileExistsError, even when it appeared meanwhile."""
    path = Path(path)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as handle:
            yield handle
        if replace:
            os.replace(tmp, path)
        else:
            _link(tmp, path)
    finally:
        with suppress(OSError):
            tmp.unlink()


def _link(tmp: Path, path: Path) -> None:
    """`tmp` also as `path`, which must not exist (taken atomically where hard links exist)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)


def temp_folder_beside(folder: str | Path) -> Path:
    """A new, empty folder beside `folder` (made exclusively, under a random name), to write a
    folder's contents into before renaming it over `folder`."""
    tmp = _temp_name(Path(folder))
    tmp.mkdir()
    return tmp
