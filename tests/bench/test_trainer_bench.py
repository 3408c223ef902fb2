"""The trainer benchmarks (bench/sft.py, rm.py, dpo.py) through what they share: the report that
the README's figures are read from keeps its columns and JSON fields, and a machine where TRL
cannot be set up gets one sentence, with no half-made venv left behind (the benchmarks run
minutes and need TRL: not a test)."""
import importlib.metadata
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest

from tests.conftest import ROOT


@pytest.fixture
def trainer_bench(monkeypatch, tmp_path):
    """bench/trainer_bench.py as the benchmarks import it, writing its results under tmp_path."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import trainer_bench

    monkeypatch.setattr(trainer_bench, "ROOT", tmp_path)
    return trainer_bench


def test_the_report_prints_both_systems_the_ratio_and_the_machine_and_writes_them(trainer_bench, tmp_path,
                                                                                    capsys):
    args = Namespace(steps=5, batch_size=4, max_seq_len=128, seed=7)
    s = trainer_bench.Setup(args, 2, {}, sys.executable, str(tmp_path / "SmolLM2"), "fp32")
    ours = trainer_bench.pair_summary("ours", [9.0, 9.0, 2.0, 2.0, 2.0], 4, 0.01)
    trl = trainer_bench.pair_summary("TRL 1.16.0", [9.0, 9.0, 4.0, 4.0, 4.0], 4, 0.0)
    peer = {"trl": "1.16.0", "transformers": "5", "torch": "2", "gradient_checkpointing": True}
    trainer_bench.report(s, "dpo", ours, trl, peer, "pairs_per_s", "batch 4 pairs", {"pairs": 40})

    out = capsys.readouterr().out
    assert "machine: " in out and "precision: ours fp32, TRL 1.16.0 fp32" in out
    assert "system     | steps timed |  s/step | pairs/s" in out
    assert "ours       |           3 |   2.000 |    2.00" in out  # the 2 warm-up steps dropped
    assert "ratio ours/TRL: 2.00" in out
    written = json.loads((tmp_path / "bench" / "results" / "dpo.json").read_text())
    assert set(written) == {"machine", "model", "precision", "batch_size", "max_seq_len", "steps",
                            "warmup_steps_dropped", "seed", "pairs", "trl", "systems", "ratio_ours_over_trl"}
    assert written["ratio_ours_over_trl"] == 2.0 and written["model"] == "SmolLM2"
    assert [row["system"] for row in written["systems"]] == ["ours", "TRL 1.16.0"]
    assert {"hardware", "cpu", "threads", "torch", "transformers"} <= set(written["machine"])


def test_where_trl_cannot_be_set_up_a_trainer_benchmark_stops_in_one_sentence(tmp_path):
    try:
        if importlib.metadata.version("trl") == "1.16.0":
            pytest.skip("our venv has TRL 1.16.0: the benchmark would run (minutes) instead of setting it up")
    except importlib.metadata.PackageNotFoundError:
        pass
    venv, empty = tmp_path / "peer", tmp_path / "no-wheels"
    empty.mkdir()
    # bench/dpo.py as run from the command line, with its peer venv moved here: no TRL anywhere
    script = (f"import runpy, sys; from pathlib import Path; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
              f"import common; common.PEER_VENV = common.OLD_PEER_VENV = Path({str(venv)!r}); "
              f"sys.argv = ['bench/dpo.py', '--steps', '3']; runpy.run_path('bench/dpo.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty)})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: could not set up TRL 1.16.0 in ") and "Traceback" not in done.stderr
    assert not venv.exists()  # the venv it had just made is gone
