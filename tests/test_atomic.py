"""Atomic writes: the destination holds the old content or the new, and no temporary file survives."""

from __future__ import annotations

import json
import math
import stat

import pytest

from specpt_hf.atomic import atomic_write, atomic_write_json, atomic_write_text, replaced_folder


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    assert atomic_write_text(path, "first") == path
    atomic_write(path, lambda tmp: tmp.write_bytes(b"second"))
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_atomic_write_json_passes_the_dumps_options(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"z": 0.5, "name": "Hα"}, ensure_ascii=False)
    assert json.loads(path.read_text(encoding="utf-8")) == {"z": 0.5, "name": "Hα"}
    assert "Hα" in path.read_text(encoding="utf-8") and path.read_text().endswith("}\n")
    with pytest.raises(ValueError):  # a failed dump leaves nothing behind
        atomic_write_json(path, {"z": math.nan}, allow_nan=False)
    assert json.loads(path.read_text(encoding="utf-8"))["z"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_replaced_folder_swaps_at_once(tmp_path):
    folder = tmp_path / "model"
    with replaced_folder(folder) as tmp:
        (tmp / "a.txt").write_text("1")
    with replaced_folder(folder) as tmp:
        assert not (tmp / "a.txt").exists()  # a fresh, empty folder
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    with pytest.raises(RuntimeError), replaced_folder(folder) as tmp:
        (tmp / "c.txt").write_text("3")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
