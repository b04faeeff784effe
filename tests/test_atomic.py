"""dit_fast.atomic: the one atomic write -- the target is the old file or the complete new one."""
import pytest

from dit_fast.atomic import atomic_write, atomic_write_text


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "a.bin"  # the folder is created
    atomic_write(path, lambda f: f.write(b"one"))
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two"
    assert atomic_write_text(tmp_path / "t.json", "{}\n").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "sub", "t.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "keep.txt"
    atomic_write_text(path, "old")

    def half_then_crash(f):
        f.write(b"new but incomplete")
        raise KeyboardInterrupt("simulated crash")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]  # hidden temp files too
