"""The two atomic writers: a failure or a crash leaves the old content or the new, never a mix."""

from __future__ import annotations

import os

import pytest

from lowmem_tune.atomic import atomic_directory, atomic_file, remove_interrupted, write_text_atomic


def test_a_failed_file_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "eval.json"
    write_text_atomic(path, "old")
    with pytest.raises(OSError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise OSError("No space left on device")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["eval.json"]


def test_replacing_a_directory_keeps_the_old_one_when_writing_fails(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("old")
    with pytest.raises(OSError):
        with atomic_directory(target, replace=True) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise OSError("No space left on device")
    assert (target / "model.safetensors").read_text() == "old"
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (target / "model.safetensors").read_text() == "new"
    assert os.listdir(tmp_path) == ["final"]


def test_a_filled_directory_is_never_replaced_unless_asked(tmp_path):
    target = tmp_path / "step-4"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(OSError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("second")
    with atomic_directory(target, first_wins=True) as tmp:  # a cache entry another run wrote meanwhile
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "first"
    assert os.listdir(tmp_path) == ["step-4"]


def test_a_kill_between_the_two_renames_of_a_replace_is_undone(tmp_path):
    """The moment inside `atomic_directory(replace=True)` where the old copy has been moved aside
    and the new one not yet renamed in: `remove_interrupted` puts the old copy back and drops the
    half-written new one; a replacement that did arrive wins over the copy set aside."""
    old = tmp_path / "step-4"
    old.mkdir()
    (old / "trainer_state.pt").write_text("complete")
    os.rename(old, tmp_path / f".step-4.replaced-{os.getpid()}")
    (tmp_path / ".step-4.tmp-abc").mkdir()
    (tmp_path / ".step-4.tmp-abc" / "model.safetensors").write_text("half")
    (tmp_path / "step-6").mkdir()
    (tmp_path / ".step-6.replaced-123").mkdir()
    remove_interrupted(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["step-4", "step-6"]
    assert (tmp_path / "step-4" / "trainer_state.pt").read_text() == "complete"
