"""transfer.outputs in-process: what a replacement leaves, what recover finishes (test_checkpoints.py kills real
processes between the steps; these run in the test's own process, where mutation testing sees them)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from transfer import outputs
from transfer.errors import PipelineError


def test_write_json_replaces_the_file_and_leaves_nothing_else(tmp_path):
    final = tmp_path / "out.json"
    outputs.write_json(final, {"c": 1})
    outputs.write_json(final, {"b": 3, "a": [2]})  # in the caller's order, not sorted
    assert final.read_text() == '{\n  "b": 3,\n  "a": [\n    2\n  ]\n}\n'
    assert json.loads(final.read_text()) == {"b": 3, "a": [2]}
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]


@pytest.fixture
def steps(monkeypatch) -> list[str]:
    """The steps of each replacement, in order (the hook test_checkpoints.py uses to kill a process between them)."""
    seen: list[str] = []
    monkeypatch.setattr(outputs, "_before_step", seen.append)
    return seen


def test_a_replacement_takes_its_steps_in_order(tmp_path, steps):
    final = tmp_path / "model.keras"
    outputs.write_text(final, "old")
    assert steps == ["flush the new version", "mark the new version complete", "move the new version in",
                     "delete the old version"]
    steps.clear()
    outputs.write_text(final, "new")
    assert steps == ["flush the new version", "mark the new version complete", "set the old version aside",
                     "move the new version in", "delete the old version"]
    assert final.read_text() == "new" and [path.name for path in tmp_path.iterdir()] == ["model.keras"]


class Stop(BaseException):
    pass


def stop_before(monkeypatch, step: str) -> None:
    def hook(name: str) -> None:
        if name == step:
            raise Stop

    monkeypatch.setattr(outputs, "_before_step", hook)


def siblings(folder: Path) -> list[str]:
    return sorted(path.name.replace(str(os.getpid()), "PID") for path in folder.iterdir())


@pytest.mark.parametrize(("step", "left", "recovered"), [
    ("flush the new version", ["model.keras"], "old"),
    ("mark the new version complete", [".model.tmp-PID.keras", "model.keras"], "old"),
    ("set the old version aside", [".model.new-PID.keras", "model.keras"], "new"),
    ("move the new version in", [".model.new-PID.keras", ".model.old-PID.keras"], "new"),
    ("delete the old version", [".model.old-PID.keras", "model.keras"], "new"),
])
def test_recover_finishes_a_replacement_stopped_before_any_step(tmp_path, monkeypatch, step, left, recovered):
    final = tmp_path / "model.keras"
    outputs.write_text(final, "old")
    stop_before(monkeypatch, step)
    with pytest.raises(Stop):
        outputs.write_text(final, "new")
    # An exception before the flush deletes the temporary; a kill (no exception) at the later steps leaves it.
    assert siblings(tmp_path) == left
    monkeypatch.setattr(outputs, "_before_step", None)
    outputs.recover(final)  # what the next start does
    assert final.read_text() == recovered and siblings(tmp_path) == ["model.keras"]


def test_recover_moves_an_old_version_back_when_there_is_no_new_one(tmp_path):
    final = tmp_path / "folder"
    aside = tmp_path / ".folder.old-123"
    aside.mkdir()
    (aside / "a").write_text("old")
    (tmp_path / ".folder.tmp-456").mkdir()  # a half-written new version: deleted
    (tmp_path / "unrelated").write_text("kept")
    outputs.recover(final)
    assert (final / "a").read_text() == "old" and siblings(tmp_path) == ["folder", "unrelated"]


def test_recover_keeps_the_current_version_and_deletes_an_old_one(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("current")
    (tmp_path / ".out.old-1.txt").write_text("older")
    (tmp_path / ".out.tmp-1.txt").symlink_to(tmp_path / "nowhere")  # a dangling link is a leftover too
    outputs.recover(final)
    assert final.read_text() == "current" and siblings(tmp_path) == ["out.txt"]


def test_recover_moves_in_the_newest_complete_version(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("current")
    (tmp_path / ".out.new-1.txt").write_text("first")
    (tmp_path / ".out.new-2.txt").write_text("second")
    outputs.recover(final)
    assert final.read_text() == "second" and siblings(tmp_path) == ["out.txt"]


def test_a_folder_replaces_a_file_and_a_symlink_is_replaced_not_followed(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("target")
    final = tmp_path / "out"
    final.symlink_to(target)
    with outputs.atomic_output(final) as temporary:
        temporary.mkdir()
        (temporary / "sub").mkdir()
        (temporary / "sub" / "a").write_text("a")
    assert (final / "sub" / "a").read_text() == "a" and not final.is_symlink()
    assert target.read_text() == "target" and siblings(tmp_path) == ["out", "target.txt"]


def test_a_failed_write_leaves_the_old_version_and_no_temporary(tmp_path):
    final = tmp_path / "sub" / "out.txt"
    outputs.write_text(final, "old")
    with pytest.raises(ValueError, match="broken"):
        with outputs.atomic_output(final) as temporary:
            temporary.mkdir()
            (temporary / "a").write_text("half")
            raise ValueError("broken")
    assert final.read_text() == "old" and siblings(final.parent) == ["out.txt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_no_room_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, code):
    final = tmp_path / "out.txt"
    with pytest.raises(PipelineError) as error:
        with outputs.atomic_output(final) as temporary:
            temporary.write_text("half")
            raise OSError(code, os.strerror(code))
    assert str(error.value) == (f"no room to write {final}: {os.strerror(code)} (free disk space under "
                                f"{tmp_path.resolve()} and rerun)")
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


def test_another_os_error_is_not_called_no_room(tmp_path):
    with pytest.raises(PermissionError):
        with outputs.atomic_output(tmp_path / "out.txt") as temporary:
            temporary.write_text("half")
            raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []


def test_no_room_without_a_strerror_names_the_error(tmp_path):
    error = outputs.no_room(tmp_path / "x", OSError("disk gone"))
    assert str(error) == f"no room to write {tmp_path / 'x'}: disk gone (free disk space under {tmp_path} and rerun)"


def test_remove_deletes_files_folders_and_links_but_not_what_a_link_points_to(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a").write_text("a")
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    outputs.remove(link)
    outputs.remove(dangling)
    assert (folder / "sub" / "a").exists()
    outputs.remove(folder)
    outputs.remove(tmp_path / "never there")
    assert list(tmp_path.iterdir()) == []


def test_fsync_tree_flushes_every_file_before_its_folder(tmp_path, monkeypatch):
    """Which paths reach os.fsync, in order (recorded, then really flushed): a folder's files before the folder,
    innermost folders first, so the folder entries are durable only once what they name is."""
    synced: list[str] = []
    fsync = os.fsync

    def record(descriptor: int) -> None:
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{descriptor}"), tmp_path))
        fsync(descriptor)

    monkeypatch.setattr(outputs.os, "fsync", record)
    (tmp_path / "f" / "sub").mkdir(parents=True)
    (tmp_path / "f" / "sub" / "a").write_text("a")
    (tmp_path / "f" / "b").write_text("b")
    (tmp_path / "g").write_text("g")
    (tmp_path / "link").symlink_to(tmp_path / "f", target_is_directory=True)
    outputs.fsync_tree(tmp_path / "f")
    assert synced == ["f/sub/a", "f/sub", "f/b", "f"]
    synced.clear()
    outputs.fsync_tree(tmp_path / "g")
    outputs.fsync_tree(tmp_path / "link")  # the folder it points to is not this output's to flush
    outputs.fsync_tree(tmp_path / "missing")
    assert synced == ["g"]
