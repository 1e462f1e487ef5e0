"""Issue 22: the GPU paths, round two, without a GPU (arch list, capability, cgroup files, device count patched)."""
from __future__ import annotations

import dataclasses
import os
import threading
import types
import warnings

import numpy as np
import pytest
import torch

from pipeline import backbones
from pipeline.errors import UserError
from pipeline.features import extraction
from tests.conftest import stand_in_weights

CUDA = torch.device("cuda", 0)


# --------------------------------------------------------------------------- 1. TF32 off, guarded and thread-safe


def _tf32_state():
    conv = torch.backends.cudnn.conv
    return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


def test_exact_fp32_falls_back_to_allow_tf32_on_torch_before_2_9(monkeypatch):
    # torch <= 2.8 has no cudnn.conv.fp32_precision: the allow_tf32 switches are used instead
    monkeypatch.setattr(torch.backends.cudnn, "conv", types.SimpleNamespace(), raising=False)
    flags = types.SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(torch.backends.cuda, "matmul", flags)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    with extraction.exact_fp32(CUDA, "fp32"):
        assert (torch.backends.cudnn.allow_tf32, flags.allow_tf32) == (False, False)
    assert (torch.backends.cudnn.allow_tf32, flags.allow_tf32) == (True, True)


def test_exact_fp32_in_two_threads_restores_tf32_after_the_last_one():
    before = _tf32_state()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with extraction.exact_fp32(CUDA, "fp32"):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with extraction.exact_fp32(CUDA, "fp32"):
            b_in.set()
            a_out.wait(5)
            seen["after_first_left"] = _tf32_state()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["after_first_left"] == ("ieee", "ieee")  # the other thread still runs in IEEE fp32
    assert _tf32_state() == before  # and nothing is left switched for good


# --------------------------------------------------------------------------- 3. a GPU this torch has no kernels for


@pytest.mark.parametrize("capability, arch_list, expected", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90"], False),  # V100 under a wheel built for sm75+
    ((6, 0), ["sm_75", "sm_80"], False),  # P100
    ((8, 6), ["sm_80", "sm_90"], True),  # sm_80 cubin runs on sm_86
    ((8, 0), ["sm_86"], False),  # a newer minor does not run on an older one
    ((12, 0), ["sm_90", "compute_90"], True),  # PTX is compiled by the driver for newer GPUs
    ((7, 5), [], True),  # a build that does not say
])
def test_has_kernels_reads_the_arch_list(capability, arch_list, expected):
    assert backbones.has_kernels(capability, arch_list) is expected


@pytest.fixture
def v100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.version, "hip", None)


def test_auto_on_a_gpu_without_kernels_runs_on_the_cpu_with_a_warning(v100):
    with pytest.warns(UserWarning, match=r"Tesla V100 \(compute capability 7.0\) has no kernels.*running on the CPU"):
        assert backbones.choose_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_explicit_cuda_without_kernels_is_one_line_user_error(v100, spec):
    with pytest.raises(UserError, match=r"has no kernels in this torch .*built for sm_75 sm_80 sm_90.*--device cpu") \
            as info:
        backbones.choose_device(spec)
    assert "\n" not in str(info.value)


def test_auto_on_a_gpu_with_kernels_picks_it(v100, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backbones.choose_device("auto") == torch.device("cuda")


# --------------------------------------------------------------------------- 4. loader batches for the workers


class _Features(torch.nn.Module):
    """Stands in for the backbone: records each forward's size."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        return x.float().mean((2, 3)).repeat(1, 171)[:, :512]


@pytest.mark.parametrize("workers", [2, 3])
def test_a_small_split_is_decoded_by_every_worker_and_forwarded_in_one_batch(tmp_path, monkeypatch, small_images,
                                                                              workers):
    from pipeline.data import imagefolder
    from .conftest import make_dataset

    root = make_dataset(tmp_path / "data", n_train=12, n_val=1)
    relpaths = sorted(str(p.relative_to(root)) for p in (root / "train").rglob("*.jpg"))  # 24 images
    model = _Features()
    monkeypatch.setattr(backbones.network, "feature_extractor", lambda weights, device, channels_last=True: model)
    real_getitem = imagefolder.ExtractionDataset.__getitem__

    def getitem(self, index):  # which loader process decoded this image (forked workers inherit the patch)
        sample = real_getitem(self, index)
        sample["error"] = sample["error"] or f"worker {torch.utils.data.get_worker_info().id}"
        return sample

    engine = extraction.Extractor(stand_in_weights(), torch.device("cpu"), "fp32", batch_size=256, workers=workers)
    monkeypatch.setattr(imagefolder.ExtractionDataset, "__getitem__", getitem)
    decoded_by = {e for b in engine.batches(str(root), relpaths) for e in b.error}
    assert decoded_by == {f"worker {i}" for i in range(workers)}
    monkeypatch.setattr(imagefolder.ExtractionDataset, "__getitem__", real_getitem)
    out = list(engine.batches(str(root), relpaths))
    assert len(out) == 1 and model.sizes == [len(relpaths)]  # one forward batch, assembled by all the workers
    assert sorted(out[0].index) == list(range(len(relpaths)))


@pytest.mark.parametrize("forward_images, workers, images, expected", [
    (256, 11, None, 23), (256, 11, 245, 23), (256, 11, 40, 4), (256, 0, None, 256), (32, 1, 1000, 32), (3, 8, None, 1),
])
def test_loader_batch_size_spreads_one_forward_batch_over_the_workers(forward_images, workers, images, expected):
    assert extraction.loader_batch_size(forward_images, workers, images) == expected


# --------------------------------------------------------------------------- 5. CFS quotas


def _cgroup(tmp_path, monkeypatch, files: dict, cores: int = 16):
    for name, text in files.items():
        path = tmp_path / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(extraction, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "250000 100000\n"}, 3),  # docker --cpus 2.5 (cgroup v2): rounded up
    ({"cpu.max": "max 100000\n"}, 16),  # no limit: the affinity
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 16),  # v1, no limit
    ({"cpu.max": "6400000 100000\n"}, 16),  # a quota above the affinity: the affinity
    ({}, 16),  # no cgroup files at all
])
def test_allowed_cores_honour_the_cfs_quota(tmp_path, monkeypatch, files, expected):
    _cgroup(tmp_path, monkeypatch, files)
    assert extraction.allowed_cores() == expected


def test_loader_workers_follow_a_kubernetes_cpu_limit(tmp_path, monkeypatch):
    _cgroup(tmp_path, monkeypatch, {"cpu.max": "400000 100000\n"}, cores=64)
    assert extraction.default_workers(CUDA) == 3
    assert extraction.default_workers(torch.device("cpu")) == 2


# --------------------------------------------------------------------------- 12. the out-of-memory hint of finetune's passes


def test_out_of_memory_in_a_val_pass_names_the_eval_batch_size(tiny_data, tmp_path, monkeypatch, small_images):
    from pipeline.config import FinetuneConfig
    from pipeline.finetune import stage as finetune

    def oom(*args, **kwargs):
        raise extraction._OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(finetune, "evaluate", oom)
    cfg = FinetuneConfig(data=str(tiny_data), cache=str(tmp_path / "c"), weights="random", device="cpu",
                         mode="finetune", epochs=1, batch_size=6, workers=0, progress=False)
    # the val pass holds max(--batch-size, 32) images on CPU, not --batch-size
    with pytest.raises(UserError, match=r"out of memory on cpu with --eval-batch-size 32; lower it "
                                        r"\(e.g. --eval-batch-size 16\)"):
        finetune.run(cfg)
    with pytest.raises(UserError, match=r"with --eval-batch-size 8; lower it"):
        finetune.run(dataclasses.replace(cfg, eval_batch_size=8))


def test_out_of_memory_in_a_frozen_prefix_chunk_names_the_eval_batch_size(tiny_data, tmp_path, monkeypatch,
                                                                           small_images):
    from pipeline.config import FinetuneConfig
    from pipeline.finetune import stage as finetune

    def oom(self, x):
        raise extraction._OUT_OF_MEMORY("CUDA out of memory.")

    monkeypatch.setattr(finetune._Net, "features", oom)
    cfg = FinetuneConfig(data=str(tiny_data), cache=str(tmp_path / "c"), weights="random", device="cpu",
                         mode="fixed", epochs=1, batch_size=6, eval_batch_size=12, workers=0, progress=False)
    with pytest.raises(UserError, match=r"with --eval-batch-size 12; lower it"):
        finetune.run(cfg)


def test_eval_batch_size_is_an_option_of_finetune():
    from pipeline import cli

    args = cli.get_args_parser().parse_args(["finetune", "--eval-batch-size", "64"])
    assert args.eval_batch_size == 64


# --------------------------------------------------------------------------- 13. predict --model on cuda:N


@pytest.mark.parametrize("device, expected", [
    ("cuda:1", [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
    ("cuda", [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    ("auto", [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    ("cpu", ["CPUExecutionProvider"]),
])
def test_predict_model_runs_on_the_gpu_it_names(device, expected):
    from pipeline.export import client

    assert client.execution_providers(device, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == expected
    assert client.execution_providers(device, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_onnx_classifier_hands_the_device_id_to_onnx_runtime(monkeypatch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from pipeline.export import client

    seen = {}

    class Stop(Exception):
        pass

    def session(path, options, providers):
        seen["providers"] = providers
        raise Stop("stand-in session")

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(UserError):  # the stand-in session fails: reported as an unreadable model
        client.OnnxClassifier(str(model), device="cuda:3")
    assert seen["providers"][0] == ("CUDAExecutionProvider", {"device_id": 3})


# --------------------------------------------------------------------------- 6. --decode auto|pil|gpu


def _photo_like(path, rng, size, mode="RGB", **save):
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1)
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    image = image.convert(mode) if mode != "RGB" else image
    image.save(path, **save)


@pytest.fixture
def mixed_images(tmp_path):
    """JPEGs the tensor decoder takes (RGB, greyscale, EXIF-rotated) and files it must leave to PIL."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "img"
    root.mkdir()
    for i in range(4):
        _photo_like(root / f"rgb{i}.jpg", rng, (300 + 40 * i, 260), quality=90)
    _photo_like(root / "grey.jpg", rng, (280, 300), mode="L", quality=90)
    _photo_like(root / "cmyk.jpg", rng, (300, 280), mode="CMYK", quality=90)
    _photo_like(root / "png.png", rng, (290, 270))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _photo_like(root / "rotated.jpg", rng, (320, 260), quality=90, exif=exif.tobytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root, sorted(p.name for p in root.iterdir())


# The tolerance the CPU test holds the tensor decode path to: per-image relative error of the
# features, ||tensor - pil|| / ||pil||, against PIL at full resolution (no draft).
TENSOR_DECODE_RTOL = 0.01


def test_tensor_decode_gives_features_within_tolerance_of_pil(mixed_images, monkeypatch):
    # torchvision.io.decode_jpeg on the CPU stands in for nvJPEG: the same path, the same transforms
    if not extraction.tensor_decode_available():
        pytest.skip("torchvision without decode_jpeg(apply_exif_orientation=...)")
    from pipeline.data import imagefolder

    root, names = mixed_images
    torch.manual_seed(0)
    weights = extraction.load_weights("random", 0)
    decoded_on = []
    real = imagefolder.decode_jpegs
    monkeypatch.setattr(imagefolder, "decode_jpegs", lambda blobs, device: decoded_on.append(len(blobs))
                        or real(blobs, device))
    out = {}
    for decode in ("pil", "tensor"):
        engine = extraction.Extractor(weights, torch.device("cpu"), "fp32", batch_size=16, workers=0, decode=decode)
        (batch,) = list(engine.batches(str(root), names, draft=False))
        out[decode] = batch
    pil, tensor = out["pil"], out["tensor"]
    assert pil.error == tensor.error and sum(bool(e) for e in pil.error) == 1  # broken.jpg, on both paths
    assert decoded_on[0] == 6  # 4 RGB + grey + rotated JPEGs decoded by torchvision, in one call
    ok = [i for i, e in enumerate(pil.error) if not e]
    a, b = pil.features[ok], tensor.features[ok]
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert rel.max() <= TENSOR_DECODE_RTOL, dict(zip([names[i] for i in ok], rel.round(5)))


def test_only_plain_jpegs_go_to_the_tensor_decoder(mixed_images):
    from pipeline.data import images

    root, names = mixed_images
    taken = {n for n in names if images.tensor_decodable((root / n).read_bytes())}
    assert taken == {"grey.jpg", "rotated.jpg", "rgb0.jpg", "rgb1.jpg", "rgb2.jpg", "rgb3.jpg"}


def test_a_jpeg_the_tensor_decoder_rejects_falls_back_to_pil(mixed_images, monkeypatch):
    from pipeline.data import imagefolder

    root, names = mixed_images

    def picky(blobs, device):  # rgb1.jpg is refused, as nvJPEG refuses some encodings
        if any(b == (root / "rgb1.jpg").read_bytes() for b in blobs):
            raise RuntimeError("nvjpeg: unsupported")
        return [torch.zeros(3, 260, 300, dtype=torch.uint8) for _ in blobs]

    monkeypatch.setattr(imagefolder, "decode_jpegs", picky)
    engine = extraction.Extractor(stand_in_weights(), torch.device("cpu"), "fp32", batch_size=16, workers=0, decode="tensor")
    engine.model = _Features()
    images, errors = engine._decode_jpegs([(root / n).read_bytes() for n in ("rgb0.jpg", "rgb1.jpg")])
    assert errors == ["", ""] and images.shape[0] == 2
    assert images[0].abs().sum() > 0 and images[1].std() > 0.1  # rgb1 decoded by PIL, rgb0 by the stand-in


@pytest.mark.parametrize("spec, device, engine, expected", [
    ("auto", "cpu", "torch", "pil"),
    ("auto", "cuda", "torch", "tensor"),
    ("auto", "cuda", "onnxruntime", "pil"),
    ("pil", "cuda", "torch", "pil"),
    ("gpu", "cuda", "torch", "tensor"),
])
def test_choose_decode(spec, device, engine, expected):
    assert extraction.choose_decode(spec, torch.device(device), engine) == expected


def test_decode_gpu_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match=r"--decode gpu decodes on the CUDA device .* use --device cuda"):
        extraction.choose_decode("gpu", torch.device("cpu"))


def test_the_tensor_decode_path_is_part_of_the_cache_key_and_pil_keeps_the_old_one(tiny_data, tmp_path):
    from pipeline.config import FeaturesConfig
    from pipeline.features import stage as features

    cfg = FeaturesConfig(data=str(tiny_data), cache=str(tmp_path / "c"), weights="random", device="cpu")
    pil = features.resolve(cfg)
    assert pil.decode == "pil" and "decode" not in pil.settings["transform"]
    assert features.resolve(dataclasses.replace(cfg, decode="pil")).path == pil.path
    assert features._transform(cfg, "tensor", None)["decode"].startswith("torchvision.io.decode_jpeg")


def test_cpu_extraction_decodes_on_every_core_between_forward_passes(tmp_path, monkeypatch, small_images):
    # no loader process competes with the compute threads: decoding and the forward take turns
    from pipeline.data import imagefolder
    from .conftest import make_dataset

    root = make_dataset(tmp_path / "data", n_train=10, n_val=1)
    relpaths = sorted(str(p.relative_to(root)) for p in (root / "train").rglob("*.jpg"))
    model = _Features()
    monkeypatch.setattr(backbones.network, "feature_extractor", lambda weights, device, channels_last=True: model)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(extraction, "CGROUP_ROOT", str(tmp_path / "no-cgroup"))
    real_getitem = imagefolder.ExtractionDataset.__getitem__
    threads = set()

    def getitem(self, index):
        threads.add(threading.current_thread().name)
        return real_getitem(self, index)

    monkeypatch.setattr(imagefolder.ExtractionDataset, "__getitem__", getitem)
    monkeypatch.setattr(torch.utils.data, "DataLoader", None)  # no loader processes, nor a loader
    engine = extraction.Extractor(stand_in_weights(), torch.device("cpu"), "fp32", batch_size=8)
    out = list(engine.batches(str(root), relpaths))
    assert [len(b.index) for b in out] == [8, 8, 4] and model.sizes == [8, 8, 4]
    assert sorted(i for b in out for i in b.index) == list(range(20))
    assert len(threads) == 2 and all(name.startswith("decode") for name in threads)
    assert not extraction.Extractor(stand_in_weights(), torch.device("cpu"), "fp32").decodes_in_process(views=2)


@pytest.mark.parametrize("argv, expected", [
    (["features", "--data", "{data}", "--weights", "random", "--device", "cpu", "--decode", "gpu"],
     "--decode gpu decodes on the CUDA device"),
    (["finetune", "--data", "{data}", "--weights", "random", "--eval-batch-size", "-1"], "--eval-batch-size -1 must be >= 0"),
])
def test_user_errors_of_the_new_options_are_one_line_exit_2(tiny_data, tmp_path, capsys, argv, expected):
    from pipeline.cli import main

    argv = [a.replace("{data}", str(tiny_data)) for a in argv] + ["--cache", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and expected in err
