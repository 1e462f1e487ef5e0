"""Sharded extraction under torchrun: two CPU ranks (gloo) write the single-process cache."""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from pipeline import distributed
from pipeline.features import stage as features, store
from pipeline.config import FeaturesConfig
from pipeline.errors import UserError
from tests.conftest import make_dataset

REPO = Path(__file__).resolve().parents[1]
VIEWS = 1  # the richest layout: augmented views of the train split travel through the shards too


def _cfg(data, cache, **kw) -> FeaturesConfig:
    return FeaturesConfig(data=str(data), cache=str(cache), weights="random", device="cpu", progress=False,
                          workers=0, views=VIEWS, **kw)


def _torchrun(data, cache, *extra, script=None, wait=True, timeout=150):
    """``torchrun --standalone --nproc_per_node=2 -m pipeline features ...`` (or ``script``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *(["-m", "pipeline"] if script is None else [str(script)]),
           "features", "--data", str(data), "--cache", str(cache), "--weights", "random", "--device", "cpu",
           "--workers", "0", "--views", str(VIEWS), "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    return finish(proc, timeout)


def finish(proc, timeout: float) -> tuple:
    """``(returncode, stdout, stderr)`` of a torchrun launch; one that hangs is killed, ranks too, and fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError("the distributed run hung")
    return proc.returncode, out, err


def _kill_tree(proc) -> None:
    """SIGKILL torchrun and its ranks (they run in sessions of their own)."""
    try:
        victims = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(victims, timeout=10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small data set (one undecodable file) and its single-process cache."""
    root = tmp_path_factory.mktemp("dist")
    data = make_dataset(root / "data", n_train=5, n_val=3)
    (data / "train" / "bees" / "zero.jpg").write_bytes(b"")
    result = features.run(_cfg(data, root / "single"))
    assert result.processes == 1 and len(result.skipped) == 1
    return data, result


def _assert_same_cache(path: str, ref: str) -> None:
    a_meta, b_meta = store.read_meta(path), store.read_meta(ref)
    assert a_meta["content_key"] == b_meta["content_key"]
    assert a_meta["classes"] == b_meta["classes"]
    with h5py.File(path, "r") as a, h5py.File(ref, "r") as b:
        assert sorted(a) == sorted(b) == ["train", "val"]
        for split in ("train", "val"):
            ga, gb = a[split], b[split]
            assert sorted(ga) == sorted(gb)
            assert list(ga["paths"].asstr()[()]) == list(gb["paths"].asstr()[()])
            assert ga["labels"][()].tolist() == gb["labels"][()].tolist()
            np.testing.assert_allclose(ga["features"][()], gb["features"][()], rtol=1e-5, atol=1e-5)
            if "views" in gb:
                np.testing.assert_allclose(ga["views"][()], gb["views"][()], rtol=1e-5, atol=1e-5)
            assert ga.attrs["complete"] and ga.attrs["n"] == gb.attrs["n"]
            assert [s["path"] for s in a_meta["splits"][split]["skipped"]] == \
                [s["path"] for s in b_meta["splits"][split]["skipped"]]


def _computed(stdout: str) -> int:
    return int(re.search(r"computed\s+(\d+) images", stdout).group(1))


def test_two_ranks_write_the_single_process_cache(reference, tmp_path):
    data, single = reference
    rc, out, err = _torchrun(data, tmp_path / "c")
    assert rc == 0, err[-3000:]
    assert out.count("feature cache") == 1, out  # rank 0 alone reports
    assert "2 processes on cpu" in out and _computed(out) == 17
    path = glob.glob(str(tmp_path / "c/features/*.h5"))
    assert [os.path.basename(p) for p in path] == [os.path.basename(single.path)]
    _assert_same_cache(path[0], single.path)
    assert store.read_meta(path[0])["extract_processes"] == 2
    assert not os.path.exists(store.shards_dir(path[0])) and not os.path.exists(store.parts_dir(path[0]))
    # The same cache in every respect: a single process finds nothing to do.
    assert features.run(_cfg(data, tmp_path / "c")).up_to_date


_SLOW_RANK = """
import sys, time
import pipeline.features.store as s
original = s.write_part
def slow(*a, **k):
    out = original(*a, **k)
    time.sleep(0.5)
    return out
s.write_part = slow
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_distributed_run_resumes_each_ranks_remaining_work(reference, tmp_path):
    data, single = reference
    script = tmp_path / "slow_rank.py"
    script.write_text(_SLOW_RANK)
    proc = _torchrun(data, tmp_path / "c", "--batch-size", "2", script=script, wait=False)
    pattern = str(tmp_path / "c/features/*.parts/rank*-of-2-*.npz")

    def both_ranks_saved_parts() -> bool:
        names = glob.glob(pattern)
        return len(names) >= 4 and {os.path.basename(n)[:10] for n in names} == {"rank0-of-2", "rank1-of-2"}

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not both_ranks_saved_parts():
        time.sleep(0.05)
    _kill_tree(proc)
    assert not glob.glob(str(tmp_path / "c/features/*.h5"))  # nothing partial under the final name
    cache = glob.glob(str(tmp_path / "c/features/*.parts"))[0][: -len(".parts")]
    # What the ranks had finished: batches (parts), and the shard of a rank that was done.
    done = {**store.read_shards(cache), **store.read_parts(store.parts_dir(cache))}
    assert 4 <= len(done) < 17

    rc, out, err = _torchrun(data, tmp_path / "c")
    assert rc == 0, err[-3000:]
    assert _computed(out) == 17 - len(done)  # only what no rank had finished
    _assert_same_cache(glob.glob(str(tmp_path / "c/features/*.h5"))[0], single.path)


def test_a_failing_rank_stops_every_rank(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=2, n_val=1)
    (data / "val" / "bees" / "broken.jpg").write_bytes(b"garbage")
    start = time.time()
    rc, out, err = _torchrun(data, tmp_path / "c", "--strict", "--dist-timeout", "60", timeout=120)
    assert rc != 0 and time.time() - start < 100
    assert "broken.jpg" in err and "--strict" in err
    assert "rank" in err and "stopped during extraction" in err  # the other rank says why it stopped
    assert out.count("feature cache") == 0


def test_shards_left_by_a_killed_job_are_reused(reference, tmp_path):
    """Rank 0 died after every shard was written: any later run (here one process) only stitches."""
    data, single = reference
    cfg = _cfg(data, tmp_path / "c")
    res = features.resolve(cfg)
    todo = features.prepare(res, cfg).todo
    for rank in range(2):
        ctx = distributed.Context(rank=rank, world_size=2)
        features._extract_shard(res, cfg, ctx, features.share(todo, rank, 2))
    shards = glob.glob(os.path.join(store.shards_dir(res.path), "rank*-of-2-*.h5"))
    assert len(shards) == 2 and not glob.glob(os.path.join(store.parts_dir(res.path), "*.npz"))
    with pytest.raises(UserError, match="not a feature cache"):
        store.read_meta(shards[0])  # a shard never passes for a cache
    with h5py.File(shards[0], "r") as f:
        assert f.attrs["format"] == store.FORMAT_SHARD and not f["train"].attrs["complete"]
        assert f.attrs["rank"] in (0, 1) and f.attrs["world_size"] == 2
    result = features.run(cfg)
    assert result.computed == 0 and not result.up_to_date
    _assert_same_cache(result.path, single.path)
    assert not os.path.exists(store.shards_dir(result.path))


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shares_are_disjoint_deterministic_and_cover_the_plan(world_size):
    todo = {"train": [(f"train/a/{i}.jpg", None) for i in range(10)], "val": [(f"val/a/{i}.jpg", None) for i in range(4)]}
    shares = [features.share(todo, r, world_size) for r in range(world_size)]
    assert shares == [features.share(todo, r, world_size) for r in range(world_size)]
    for split, entries in todo.items():
        got = [e for s in shares for e in s[split]]
        assert sorted(got) == sorted(entries) and len(got) == len(entries)
        sizes = [len(s[split]) for s in shares]
        assert max(sizes) - min(sizes) <= 1


def test_launch_is_read_from_the_torchrun_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.from_env().is_distributed  # a plain process needs no torchrun
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ctx = distributed.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert not ctx.is_primary
    assert distributed.device_spec("cuda", ctx) == "cuda:1"
    assert distributed.device_spec("cuda:0", ctx) == "cuda:0" and distributed.device_spec("cpu", ctx) == "cpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UserError, match="RANK=4"):
        distributed.from_env()
