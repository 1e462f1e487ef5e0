"""Shared helpers: the one atomic writer and its clean-up (a file under its final name is always
complete), and the one collector of library versions."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from pipeline import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    files.atomic_write(str(path), lambda fh: fh.write(b"old"))

    def fail(fh):
        fh.write(b"half")
        raise OSError("disk gone")

    with pytest.raises(OSError):
        files.atomic_write(str(path), fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_by_name_lets_a_library_create_the_file_itself(tmp_path):
    path = tmp_path / "a.h5"

    def write(tmp):
        assert tmp != str(path) and ".tmp-" in tmp
        with h5py.File(tmp, "w") as f:
            f["x"] = np.arange(3)

    files.atomic_write(str(path), write, by_name=True)
    with h5py.File(path, "r") as f:
        assert f["x"][:].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]


def test_remove_temporaries_of_one_file_or_of_a_whole_folder(tmp_path):
    for name in ("a.h5", "a.h5.tmp-1234abcd", "b.h5.tmp-5678abcd", "a.h5.lock"):
        (tmp_path / name).write_text("x")
    files.remove_temporaries(str(tmp_path), "a.h5")  # another writer may be busy with b.h5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "a.h5.lock", "b.h5.tmp-5678abcd"]
    files.remove_temporaries(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "a.h5.lock"]


def test_library_versions_in_the_order_asked_optional_ones_left_out():
    from pipeline import __version__
    from pipeline.versions import library_versions

    versions = library_versions("numpy", "python", "pipeline", "no_such_module_xyz")
    assert list(versions) == ["numpy", "python", "pipeline"]
    assert versions["numpy"] == np.__version__ and versions["pipeline"] == __version__


def test_the_cache_layout_is_written_in_one_place():
    from pipeline import paths

    path = paths.cache_file("c", "/data/hymenoptera_data/", "0123456789abcdef")
    assert path == os.path.join("c", "features", "hymenoptera_data-0123456789ab.h5")
    assert paths.shard_file(path, 1, 2, "t").startswith(path + ".shards" + os.sep)
    assert paths.run_dir("c", "scratch-3") == os.path.join("c", "runs", "scratch-3")
    assert paths.heads_dir("c") == os.path.join("c", "heads")
    assert paths.report_files("r")["md"] == os.path.join("r", "compare", "compare.md")


def test_one_table_formatter_markdown_or_plain():
    from pipeline.text import format_table

    md = format_table(("a", "bb"), [("xxx", 1)], markdown=True).splitlines()
    assert md == ["| a   | bb |", "|-----|----|", "| xxx | 1  |"]
    assert format_table(("a", "bb"), [("xxx", "")], rule=True).splitlines() == ["  a    bb", "  ---  --", "  xxx"]


@pytest.mark.parametrize("seconds, table, axis", [
    (0.0123, "12 ms", "12 ms"), (5, "5.0 s", "5 s"), (90, "90.0 s", "90 s"), (1800, "30.0 min", "30 min"),
    (7200, "2.0 h", "2 h"), (3 * 86400, "3.0 d", "3 d"),
])
def test_one_duration_formatter(seconds, table, axis):
    from pipeline.text import format_duration

    assert format_duration(seconds) == table and format_duration(seconds, compact=True) == axis


def test_the_command_line_starts_without_the_heavy_libraries():
    import subprocess
    import sys

    code = "import sys, pipeline.cli; print(sorted({'torch', 'sklearn', 'h5py'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
