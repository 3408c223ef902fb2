"""Replacing a file or folder whole (core/paths.py): the temporary file beside the target is
created exclusively, so a link planted at a name someone could guess never redirects a write
(issue 14, fourth probe, finding 4)."""
import json
import os

import pytest

from core.runs import write_json_atomic


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim" / "keep.txt"
    path.parent.mkdir()
    path.write_text("keep me")
    return path


def plant_links(folder, name, victim, pids):
    """Links at the temporary names the old code used (`.NAME.PID.tmp`) for these pids."""
    for pid in pids:
        (folder / f".{name[:64]}.{pid}.tmp").symlink_to(victim)


def test_status_json_is_never_written_through_a_planted_link(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    plant_links(run, "status.json", victim, [os.getpid()])
    write_json_atomic(run / "status.json", {"state": "done"})
    assert victim.read_text() == "keep me"
    assert not (run / "status.json").is_symlink()
    assert json.loads((run / "status.json").read_text()) == {"state": "done"}
    assert all(p.is_symlink() for p in run.glob(".*.tmp"))  # only the planted links are there


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    from core.paths import atomic_write

    target = tmp_path / "status.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_a_temporary_folder_is_new_and_beside_its_target(tmp_path):
    from core.paths import temp_folder_beside

    first, second = temp_folder_beside(tmp_path / "final"), temp_folder_beside(tmp_path / "final")
    assert first != second and first.parent == second.parent == tmp_path
    assert first.is_dir() and not any(first.iterdir()) and first.name.endswith(".tmp")
