"""Process tuning is an explicit call of each entry point (core/process.py), never an import's
side effect, and RLHF_SYSTEM_MALLOC=1 opts out."""
import os
import subprocess
import sys

from tests.conftest import ROOT

PROBE = ("import os, sys; from core import process; print(os.environ.get('THP_MEM_ALLOC_ENABLE')); "
         "process.tune_process(); print(process.keep_freed_memory(), "
         "os.environ.get('THP_MEM_ALLOC_ENABLE'), os.environ.get('DS_ACCELERATOR'))")


def probe(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("THP_MEM_ALLOC_ENABLE", "RLHF_SYSTEM_MALLOC", "DS_ACCELERATOR")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**env, **extra}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_tuning_happens_on_the_call_not_on_import():
    before, kept, thp, accelerator = probe()
    assert before == "None"  # importing core.process changed nothing
    assert (kept, thp, accelerator) == ("True", "1", "cpu")


def test_system_malloc_leaves_the_allocator_alone():
    assert probe(RLHF_SYSTEM_MALLOC="1") == ["None", "False", "None", "cpu"]
