"""Atomic writes: a failure while writing (or at the rename) leaves the previous file or folder as it was and no
temporary file behind; a finished write gets the modes of a plain open / mkdir."""

import stat

import pytest
import torch

import difflab.atomic as atomic
from difflab.atomic import atomic_dir, atomic_file, default_mode, write_bytes_atomic
from difflab.metrics.stats_files import load_stats, save_stats
from difflab.runs import load_samples, save_samples
from difflab.training.checkpoint import write_json_atomic


class Boom(Exception):
    pass


class Unserialisable:
    """Fails when json reaches it: after the keys before it were serialised."""


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_finished_write_replaces_the_file_with_the_mode_of_a_plain_open(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    assert write_bytes_atomic(target, b"new") == target
    assert target.read_bytes() == b"new" and names(tmp_path) == ["a.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == default_mode()


def test_an_error_mid_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(Boom), atomic_file(target) as f:
        f.write(b"half of the new")
        raise Boom
    assert target.read_bytes() == b"old" and names(tmp_path) == ["a.bin"]


def test_an_object_that_fails_to_serialise_keeps_the_previous_json(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    before = target.read_text()
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": 1, "b": [1, 2, 3], "z": Unserialisable()})
    assert target.read_text() == before and names(tmp_path) == ["state.json"]


@pytest.mark.parametrize("writer", ["bytes", "json", "samples", "stats"])
def test_a_failed_rename_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, writer):
    target = tmp_path / ("out.json" if writer == "json" else "out.npz")
    write = {"bytes": lambda: write_bytes_atomic(target, b"new"),
             "json": lambda: write_json_atomic(target, {"new": True}),
             "samples": lambda: save_samples(target, torch.ones(3, 2), {"new": True}),
             "stats": lambda: save_stats(target, [0.0, 1.0], [[2.0, 0.0], [0.0, 2.0]])}[writer]
    save_samples(target, torch.zeros(4, 2), {"old": True}) if writer in ("samples", "stats") \
        else target.write_bytes(b"old")
    before = target.read_bytes()

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        write()
    assert target.read_bytes() == before and names(tmp_path) == [target.name]
    monkeypatch.undo()
    write()  # and the next attempt goes through
    if writer == "samples":
        x, record = load_samples(target)
        assert x.shape == (3, 2) and record == {"new": True}
    elif writer == "stats":
        assert load_stats(target)[0].tolist() == [0.0, 1.0]


def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(Boom), atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("half")
        raise Boom
    assert names(out) == ["old.txt"] and names(tmp_path) == ["export"]
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    assert names(out) == ["sub"] and (out / "sub" / "new.txt").read_text() == "new"
    assert names(tmp_path) == ["export"]
    assert stat.S_IMODE(out.stat().st_mode) == default_mode(folder=True)


def test_a_folder_that_must_not_replace_refuses_a_full_target(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "theirs.txt").write_text("theirs")
    with pytest.raises(OSError), atomic_dir(out, replace=False) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert names(out) == ["theirs.txt"] and names(tmp_path) == ["cache"]


def test_temporary_names_are_the_ones_a_run_folder_sweeps(tmp_path):
    seen = []
    with atomic_file(tmp_path / "config.json"):
        seen += names(tmp_path)
    with atomic_dir(tmp_path / "step-00000001") as d:
        seen.append(d.name)
    assert seen[0].startswith(".config.json.") and seen[0].endswith(".tmp")
    assert seen[1].startswith(".tmp-step-00000001-")
