"""The map of the code: every arrow points down (app -> chat, train, serving -> core), no module
changes the process when imported, and the torch-free modules stay torch-free."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGES = ("core", "train", "serving", "chat")
# what each package may import of the project (besides itself)
ALLOWED = {"core": set(), "train": {"core"}, "serving": {"core"}, "chat": {"core"},
           "app": {"core", "train", "chat"}}


def project_modules() -> dict[str, set[str]]:
    """module name -> the project packages it imports (top level or inside functions)."""
    graph = {}
    files = [ROOT / "app.py"] + sorted(p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py"))
    for path in files:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            imported |= {name.split(".")[0] for name in names}
        graph[module] = imported & (set(PACKAGES) | {"app"})
    return graph


def test_every_arrow_points_down():
    wrong = {module: sorted(imported - ALLOWED[module.split(".")[0]] - {module.split(".")[0]})
             for module, imported in project_modules().items()}
    assert {m: w for m, w in wrong.items() if w} == {}


def test_modules_import_without_side_effects():
    """Importing any module of the project leaves the environment as it was (the libraries it
    builds on are imported first: what they set on import is theirs)."""
    modules = [m for m in project_modules() if not m.endswith("__main__") and m != "app"]
    probe = ("import json, os, sys, torch, deepspeed, transformers, fastapi\n"
             "before = dict(os.environ); changed = {}\n"
             "for name in sys.argv[1:]:\n"
             "    __import__(name)\n"
             "    diff = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))\n"
             "    if diff: changed[name] = diff; before = dict(os.environ)\n"
             "print(json.dumps(changed))")
    done = subprocess.run([sys.executable, "-c", probe, *modules], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("module", ["chat.ratings", "chat.rounds", "core.ratings", "core.paths", "core.runs",
                                    "core.options", "train.config", "train.data"])
def test_torch_free_modules_do_not_import_torch(module):
    done = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
