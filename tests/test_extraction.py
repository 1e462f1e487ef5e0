"""The extraction engine and the GPU paths, without a GPU (device capability, count and affinity patched)."""
from __future__ import annotations

import os
import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from pipeline import backbones
from pipeline.data import imagefolder as data
from pipeline import distributed
from pipeline.features import extraction, stage as features
from pipeline.finetune import stage as finetune
from pipeline.heads import stage as heads
from pipeline.config import FeaturesConfig, FinetuneConfig, HeadsConfig
from pipeline.errors import UserError
from tests.conftest import stand_in_weights

RESNET18_DIM = 512  # ResNet18's pooled pre-logits
STAND_IN_WEIGHTS = stand_in_weights()

from .conftest import make_dataset

CUDA = torch.device("cuda", 0)


class Recorder(torch.nn.Module):
    """Stands in for the backbone: records each forward's size and the TF32 setting it ran under."""

    def __init__(self, fail: Exception = None):
        super().__init__()
        self.sizes, self.conv_precision, self.fail = [], [], fail

    def forward(self, x):
        if self.fail is not None:
            raise self.fail
        self.sizes.append(len(x))
        self.conv_precision.append(torch.backends.cudnn.conv.fp32_precision)
        return x.float().mean((2, 3)).repeat(1, RESNET18_DIM // 3 + 1)[:, :RESNET18_DIM]


@pytest.fixture
def recorder(monkeypatch):
    model = Recorder()
    monkeypatch.setattr(backbones.network, "feature_extractor", lambda weights, device, channels_last=True: model)
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five small images and one undecodable file in the middle."""
    root = make_dataset(tmp_path_factory.mktemp("engine") / "data", n_train=3, n_val=1)
    paths = sorted(str(p.relative_to(root)) for p in (root / "train").rglob("*.jpg"))[:5]
    (root / "train" / "broken.jpg").write_bytes(b"not an image")
    return root, paths[:2] + ["train/broken.jpg"] + paths[2:]


@pytest.fixture
def gpu_without_gpu(monkeypatch):
    """Device ``cuda:0`` with host->device copies recorded (and kept on the host): no GPU needed."""
    moved = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, torch.device) and target.type == "cuda":
            moved.append(self)
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: self)
    return moved


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_views_never_multiply_the_forward_batch_and_no_host_copy_precedes_the_device_copy(
        images, recorder, gpu_without_gpu, monkeypatch, small_images):
    root, relpaths = images
    batches = []
    real_loader = extraction.Extractor.loader

    def loader(self, *args, **kwargs):  # keep the loader's own batch tensors, to compare storages
        for batch in real_loader(self, *args, **kwargs):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(extraction.Extractor, "loader", loader)
    engine = extraction.Extractor(STAND_IN_WEIGHTS, CUDA, "fp32", batch_size=4, workers=0)
    out = list(engine.batches(str(root), relpaths, views=3))
    # issue 16.2: 5 images x (1 + 3 views) = 20 forwarded, never more than --batch-size at once
    assert sum(recorder.sizes) == 5 * 4 and max(recorder.sizes) <= 4
    # issue 16.4: every tensor copied to the device is (a view of) a loader batch, never a host copy of it
    storages = {t.untyped_storage().data_ptr() for b in batches for t in (b["image"], b["views"])}
    copies = [t for t in gpu_without_gpu if t.untyped_storage().data_ptr() not in storages]
    assert gpu_without_gpu and copies == []
    # fp32 on CUDA: IEEE fp32 during the forward (no TF32), the caller's setting afterwards
    assert set(recorder.conv_precision) == {"ieee"}
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    errors = [e for b in out for e in b.error]
    assert sum(bool(e) for e in errors) == 1 and len(errors) == 6
    for b in out:
        for j, e in enumerate(b.error):
            assert (np.abs(b.features[j]).sum() == 0) == bool(e)
            assert b.views.shape[1:] == (3, RESNET18_DIM)


def test_out_of_memory_is_one_user_error_naming_the_batch_size(tiny_data, tmp_path, monkeypatch):
    oom = Recorder(fail=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 11.00 GiB"))
    monkeypatch.setattr(backbones.network, "feature_extractor", lambda weights, device, channels_last=True: oom)
    cfg = FeaturesConfig(data=str(tiny_data), cache=str(tmp_path / "c"), weights="random", device="cpu",
                         batch_size=8, workers=0, progress=False)
    with pytest.raises(UserError, match=r"out of memory on cpu with --batch-size 8; lower it \(e.g. --batch-size 4\)"):
        features.run(cfg)


def test_out_of_memory_in_finetune_names_its_batch_size(tiny_data, tmp_path, monkeypatch, small_images):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", oom)
    cfg = FinetuneConfig(data=str(tiny_data), cache=str(tmp_path / "c"), weights="random", device="cpu",
                         mode="fixed", epochs=1, batch_size=6, workers=0, progress=False)
    with pytest.raises(UserError, match=r"out of memory on cpu with --batch-size 6; lower it"):
        finetune.run(cfg)


def test_exact_fp32_turns_tf32_off_on_cuda_only_and_restores_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with extraction.exact_fp32(CUDA, "fp32"):
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    for device, precision in ((torch.device("cpu"), "fp32"), (CUDA, "bf16")):
        with extraction.exact_fp32(device, precision):
            assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_sync_waits_for_the_gpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    extraction.sync(torch.device("cpu"))
    extraction.sync(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_loader_workers_follow_the_allowed_cores_not_the_machine(monkeypatch):
    # issue 16.5: a SLURM job with 8 of 128 cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    assert extraction.allowed_cores() == 8
    assert extraction.default_workers(CUDA) == 7
    assert extraction.default_workers(CUDA, processes=8) == 1  # 8 ranks share the 8 cores
    assert extraction.default_workers(torch.device("cpu")) == 4
    assert extraction.default_workers(CUDA, images=extraction.SMALL_JOB - 1) == 0


def test_seeding_leaves_the_callers_cuda_generators_alone(monkeypatch, images, small_images):
    # issue 16.7: torch.manual_seed would reseed every CUDA generator (torch.cuda.manual_seed_all)
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    cpu_state = torch.get_rng_state()
    weights = backbones.resolve_weights("random", 3)
    root, relpaths = images
    sample = data.ExtractionDataset(str(root), relpaths[:1], views=2, seed=1)[0]
    with data.seeded(5):
        a = torch.rand(3)
    with data.seeded(5):
        b = torch.rand(3)
    assert reseeded == [] and torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(a, b) and not torch.equal(sample["views"][0], sample["views"][1])
    torch.manual_seed(3)  # what --weights random --seed 3 promises: torchvision's init under seed 3
    expected = resnet18().state_dict()
    assert all(torch.equal(weights.state_dict[k], expected[k]) for k in expected)


def test_weights_are_hashed_once_per_process(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    torch.save(backbones.build_model(None).state_dict(), path)
    hashed = []
    real = backbones.state_dict_sha256
    monkeypatch.setattr(backbones.network, "state_dict_sha256", lambda sd: hashed.append(1) or real(sd))
    first = extraction.load_weights(str(path))
    assert extraction.load_weights(str(path)) is first and len(hashed) == 1
    os.utime(path, ns=(1, 1))  # a changed file is read and checked again
    assert extraction.load_weights(str(path)).sha256 == first.sha256 and len(hashed) == 2


def test_heads_find_the_cache_from_the_index_without_weights_or_images(tiny_data, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    hcfg = HeadsConfig(data=str(tiny_data), cache=str(cache), weights="random", device="cpu")
    with pytest.raises(UserError, match="no feature cache for these settings.*pipeline features"):
        heads.features_path(hcfg)
    made = features.run(FeaturesConfig(data=str(tiny_data), cache=str(cache), weights="random", device="cpu",
                                       workers=0, progress=False))

    def forbidden(*a, **k):
        raise AssertionError("finding the cache must not load weights or list images")

    with monkeypatch.context() as m:
        m.setattr(backbones.network, "resolve_weights", forbidden)
        m.setattr(extraction, "load_weights", forbidden)
        m.setattr(data, "discover", forbidden)
        assert heads.features_path(hcfg) == made.path
    for other in ({"seed": 1}, {"views": 2}, {"precision": "bf16"}):
        with pytest.raises(UserError, match="make heads does"):
            heads.features_path(HeadsConfig(**dict(vars(hcfg), **other)))
    with pytest.raises(UserError, match="train.*is missing"):  # no cache, and the data set is why
        heads.features_path(HeadsConfig(**dict(vars(hcfg), data=str(tmp_path))))
    # A weights file names its cache by path and stat: a changed file names none until `features` runs.
    path = tmp_path / "w.pt"
    torch.save(backbones.build_model(None).state_dict(), path)
    fcfg = FeaturesConfig(data=str(tiny_data), cache=str(cache), weights=str(path), device="cpu", workers=0,
                          progress=False)
    made = features.run(fcfg)
    assert features.find_cache(fcfg) == made.path
    os.utime(path, ns=(1, 1))
    with pytest.raises(UserError, match="no feature cache"):
        features.find_cache(fcfg)


def test_a_callers_process_group_is_pinned_to_the_ranks_gpu(monkeypatch):
    # issue 16.8: the caller initialised the group; NCCL needs this rank's device to be current
    import torch.distributed as dist

    pinned = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pinned.append(device))
    ctx = distributed.Context(rank=1, world_size=2, local_rank=1, local_world_size=2)
    with distributed.session(ctx, torch.device("cuda", 1), 60.0) as joined:
        assert joined.backend == "nccl"
    assert pinned == [torch.device("cuda", 1)]
    with distributed.session(ctx, torch.device("cpu"), 60.0):
        pass
    assert len(pinned) == 1
