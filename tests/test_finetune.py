"""Stage 3: end-to-end training — learning, output schema, freezing, BatchNorm, resume, weights, CLI."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from pipeline import backbones
from pipeline import cli, config
from pipeline.finetune import stage as finetune
from pipeline.config import FinetuneConfig
from pipeline.errors import UserError
from tests.conftest import make_dataset

METRICS_KEYS = {
    "kind", "name", "mode", "seed", "metrics", "selection", "best_val_epoch", "best_val_acc", "epochs", "total_seconds", "epoch_seconds",
    "images_per_s", "predict_ms_per_image", "trainable_parameters", "total_parameters", "device",
    "precision", "weights_id", "weights_sha256", "pretrained", "classes", "data_root", "config",
    "versions", "size_bytes", "complete", "created",
}
HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
FROZEN_BY = {"fixed": ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."),
             "partial": ("conv1.", "bn1.", "layer1.", "layer2.")}  # partial: --trainable-from layer3


pytestmark = pytest.mark.usefixtures("small_images")


def _cfg(data, cache, **kw) -> FinetuneConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("epochs", 2)
    return FinetuneConfig(data=str(data), cache=str(cache), weights=kw.pop("weights", "random"),
                          device="cpu", progress=False, **kw)


def _model(run_dir, name="last.pt") -> dict:
    return torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)["model"]


def _json(run_dir, name):
    with open(os.path.join(run_dir, name), encoding="utf-8") as fh:
        return json.load(fh)


def _same_trajectory(a: dict, b: dict) -> None:
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [e[key] for e in a["epochs"]] == [e[key] for e in b["epochs"]], key


def test_loss_falls(tiny_data, tmp_path):
    # A linear head on frozen features is a convex problem: its loss falls reliably, unlike a
    # randomly initialised ResNet18 trained on 32-pixel crops in batches of 4.
    run = finetune.run(_cfg(tiny_data, tmp_path / "c", mode="fixed", lr=0.01)).runs[0]
    first, second = _json(run.path, "history.json")["epochs"]
    assert second["train_loss"] < first["train_loss"] and second["val_loss"] < first["val_loss"]


def test_finetune_writes_the_schema_and_trains_every_layer(tiny_data, tmp_path):
    result = finetune.run(_cfg(tiny_data, tmp_path / "c"))
    run = result.runs[0]
    assert run.path == str(tmp_path / "c" / "runs" / "finetune")
    assert sorted(f for f in os.listdir(run.path) if not f.startswith(".")) == [
        "history.json", "last.pt", "metrics.json", "model.pt"]

    history = _json(run.path, "history.json")
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert all(HISTORY_KEYS <= set(e) for e in history["epochs"])

    m = _json(run.path, "metrics.json")
    assert METRICS_KEYS <= set(m)
    assert (m["kind"], m["name"], m["mode"], m["seed"], m["complete"]) == ("run", "finetune", "finetune", 0, True)
    assert m["epochs"] == 2 and len(m["epoch_seconds"]) == 2 and 1 <= m["best_val_epoch"] <= 2
    assert m["weights_id"] == "random-seed0" and m["pretrained"] is False  # labelled: not pretrained
    assert m["classes"] == ["ants", "bees"] and m["data_root"] == str(tiny_data.resolve())
    assert m["trainable_parameters"] == m["total_parameters"] > 11_000_000
    assert m["size_bytes"] == os.path.getsize(os.path.join(run.path, "model.pt"))
    assert m["device"] == "cpu" and m["precision"] == "fp32" and m["images_per_s"] > 0
    assert m["config"]["mode"] == "finetune" and m["config"]["lr"] == 1e-3 and "torch" in m["versions"]
    acc = m["metrics"]
    assert acc["n"] == 8 and acc["predictions"]["paths"][0] == "val/ants/img_000.jpg"
    assert acc["accuracy"] == history["epochs"][-1]["val_acc"]  # the final epoch: nothing chosen on val
    assert m["selection"] == {"rule": "final", "selected_epoch": 2, "scored_on": "val",
                              "selected_on": "nothing: the final epoch of the fixed schedule"}
    low, high = acc["accuracy_ci95"]
    assert low <= acc["accuracy"] <= high and len(acc["confusion_matrix"]) == 2
    assert "not pretrained" in result.summary()

    # Every parameter moved; model.pt is a state_dict file that --weights PATH accepts.
    initial = backbones.resolve_weights("random", 0).state_dict
    last = _model(run.path)
    assert all(not torch.equal(last[k], initial[k]) for k in initial if k.endswith(".weight") and "fc" not in k)
    weights = backbones.resolve_weights(os.path.join(run.path, "model.pt"))
    assert weights.pretrained and weights.state_dict["fc.weight"].shape == (2, 512)


@pytest.mark.parametrize("mode", ["fixed", "partial"])
def test_frozen_layers_and_their_batchnorm_statistics_do_not_change(tiny_data, tmp_path, mode):
    run = finetune.run(_cfg(tiny_data, tmp_path / "c", mode=mode, trainable_from="layer3")).runs[0]
    initial = backbones.resolve_weights("random", 0).state_dict
    last = _model(run.path)
    frozen = [k for k in initial if k.startswith(FROZEN_BY[mode])]
    trained = [k for k in initial if k not in frozen and k.endswith(".weight") and not k.startswith("fc.")]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(last[k], initial[k]) for k in frozen)  # weights and BN running statistics
    assert all(not torch.equal(last[k], initial[k]) for k in trained)
    m = run.metrics
    expected = 2 * 512 + 2 if mode == "fixed" else m["total_parameters"] - sum(
        initial[k].numel() for k in frozen if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert m["trainable_parameters"] == expected


def test_bn_train_reproduces_the_tutorial_drift(tiny_data, tmp_path):
    run = finetune.run(_cfg(tiny_data, tmp_path / "c", mode="fixed", bn="train", epochs=1)).runs[0]
    initial = backbones.resolve_weights("random", 0).state_dict
    last = _model(run.path)
    assert torch.equal(last["conv1.weight"], initial["conv1.weight"])  # still frozen...
    assert not torch.equal(last["bn1.running_mean"], initial["bn1.running_mean"])  # ...but statistics drift
    assert run.metrics["config"]["bn"] == "train"


def test_resume_ends_bit_identical_to_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    straight = finetune.run(_cfg(tiny_data, tmp_path / "a")).runs[0]

    # 1 epoch, then asked for 2: resumes from last.pt (here with a loader process).
    first = finetune.run(_cfg(tiny_data, tmp_path / "b", epochs=1)).runs[0]
    assert first.metrics["epochs"] == 1
    # Issue 16.3: no CUDA generator state is saved or restored (nothing draws from it), so a
    # checkpoint written with 8 GPUs, even one of an earlier version that holds their states,
    # resumes where fewer are visible.
    last = os.path.join(first.path, "last.pt")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert "cuda" not in ckpt["rng"]
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    torch.save(ckpt, last)
    os.remove(os.path.join(first.path, "metrics.json"))  # its sha256 of last.pt would (rightly) refuse the edit

    def no_cuda_rng(*args):
        raise IndexError("device ordinal out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_cuda_rng)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_cuda_rng)
    reseeded = []  # 16.7: seeding leaves this process's CUDA generators alone (loader workers are apart)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(os.getpid()))
    resumed = finetune.run(_cfg(tiny_data, tmp_path / "b", workers=1)).runs[0]
    assert os.getpid() not in reseeded
    assert resumed.resumed_from == 1

    # Interrupted in epoch 2: nothing looks complete; the rerun resumes after epoch 1.
    calls = {"n": 0}
    real = finetune.train_one_epoch

    def interrupt_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(finetune, "train_one_epoch", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(_cfg(tiny_data, tmp_path / "i"))
    run_i = tmp_path / "i" / "runs" / "finetune"
    assert not (run_i / "metrics.json").exists()
    assert torch.load(run_i / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(finetune, "train_one_epoch", real)
    interrupted = finetune.run(_cfg(tiny_data, tmp_path / "i")).runs[0]
    assert interrupted.resumed_from == 1

    expected = _model(straight.path)
    for other in (resumed, interrupted):
        got = _model(other.path)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        _same_trajectory(_json(other.path, "history.json"), _json(straight.path, "history.json"))
        assert other.metrics["metrics"]["predictions"] == straight.metrics["metrics"]["predictions"]
        assert other.metrics["best_val_epoch"] == straight.metrics["best_val_epoch"]


def test_complete_run_is_reused_and_changed_settings_start_over(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "c", mode="fixed", epochs=1)
    finetune.run(cfg)
    again = finetune.run(replace(cfg, workers=1)).runs[0]  # workers never change results
    assert again.up_to_date and "up to date" in again.summary()
    changed = finetune.run(replace(cfg, lr=0.05)).runs[0]
    assert not changed.up_to_date and changed.resumed_from == 0
    assert _json(changed.path, "history.json")["epochs"][0]["lr"] == 0.05
    rebuilt = finetune.run(replace(cfg, lr=0.05, rebuild=True)).runs[0]
    assert not rebuilt.up_to_date and rebuilt.resumed_from == 0


def test_three_weights_sources(tiny_data, tmp_path, monkeypatch):
    # PATH: a plain state_dict file.
    torch.manual_seed(7)
    sd = backbones.build_model(None).state_dict()
    path = tmp_path / "my_weights.pt"
    torch.save(sd, path)
    run = finetune.run(_cfg(tiny_data, tmp_path / "c", mode="fixed", epochs=1, weights=str(path))).runs[0]
    assert run.metrics["weights_id"] == "file:my_weights.pt" and run.metrics["pretrained"] is True
    assert run.metrics["weights_sha256"] == backbones.state_dict_sha256(sd)
    assert torch.equal(_model(run.path)["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])

    # imagenet: read from torch's hub cache (TORCH_HOME is a temporary folder in tests).
    with pytest.raises(UserError, match="not cached"):
        finetune.run(_cfg(tiny_data, tmp_path / "d", mode="fixed", epochs=1, weights="imagenet"))
    target = backbones.imagenet_cache_file()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    torch.save(sd, target)
    run = finetune.run(_cfg(tiny_data, tmp_path / "d", mode="fixed", epochs=1, weights="imagenet")).runs[0]
    assert run.metrics["weights_id"] == "imagenet" and run.metrics["pretrained"] is True
    assert run.metrics["weights_sha256"] == backbones.state_dict_sha256(sd)

    # scratch ignores --weights: seeded random init, labelled not pretrained.
    run = finetune.run(_cfg(tiny_data, tmp_path / "e", mode="scratch", epochs=1, seed=3,
                            weights="imagenet")).runs[0]
    assert run.path.endswith("scratch-3") and run.metrics["weights_id"] == "random-seed3"
    assert run.metrics["pretrained"] is False
    assert run.metrics["weights_sha256"] == backbones.resolve_weights("random", 3).sha256


def test_bf16_autocast_on_cpu_is_optional_and_recorded(tiny_data, tmp_path):
    run = finetune.run(_cfg(tiny_data, tmp_path / "c", mode="partial", epochs=1, precision="bf16")).runs[0]
    assert run.metrics["precision"] == "bf16" and "bf16" in run.summary()
    assert all(torch.isfinite(v).all() for v in _model(run.path).values() if v.is_floating_point())


def test_cli_seeds_mean_std_and_undecodable_images(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=3)
    (data / "train" / "ants" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (data / "val" / "bees" / "empty.png").write_bytes(b"")
    code = cli.main(["finetune", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "random",
                     "--device", "cpu", "--mode", "fixed", "--epochs", "1", "--seeds", "0,1",
                     "--workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "±" in out and "not pretrained" in out and "broken.jpg" in out
    for name in ("fixed", "fixed-1"):
        m = _json(tmp_path / "c" / "runs" / name, "metrics.json")
        assert m["seed"] == (0 if name == "fixed" else 1) and m["metrics"]["n"] == 6
        assert sorted(s["path"] for s in m["skipped"]) == ["train/ants/broken.jpg", "val/bees/empty.png"]


@pytest.mark.parametrize("args, message", [
    (["--mode", "frozen"], "--mode 'frozen' is not recognised"),
    (["--mode", "partial", "--trainable-from", "layer9"], "--trainable-from 'layer9'"),
    (["--bn", "drift"], "--bn 'drift'"),
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--seeds", "0,x"], "comma-separated"),
    (["--select", "best-val"], "Only final or holdout:F"),
    (["--select", "holdout:1.5"], "Only final or holdout:F"),
    (["--select", "holdout:0.05"], "cannot keep every one of 2 classes"),
    (["--train-per-class", "7"], "exceeds the 6 train images"),
    (["--eval-every", "-1"], "--eval-every -1 must be >= 0"),
    (["--weights", "no/such/file.pt"], "no such file"),
])
def test_cli_user_errors_exit_2_with_one_line(tiny_data, tmp_path, capsys, args, message):
    code = cli.main(["finetune", "--data", str(tiny_data), "--cache", str(tmp_path / "c"),
                     "--weights", "random", "--no-progress"] + args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_help_lists_every_hyper_parameter(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    out = capsys.readouterr().out
    for option in ("--mode", "--trainable-from", "--bn", "--epochs", "--batch-size", "--lr", "--momentum",
                   "--weight-decay", "--step-size", "--gamma", "--seed", "--seeds", "--weights", "--device",
                   "--precision", "--rebuild", "--select", "--train-per-class"):
        assert option in out


@pytest.mark.slow
def test_fixed_mode_on_the_real_data_set(real_data, tmp_path, monkeypatch):
    monkeypatch.setitem(config.PREPROCESS, "resize", 256)
    monkeypatch.setitem(config.PREPROCESS, "crop", 224)
    run = finetune.run(_cfg(real_data, tmp_path / "c", mode="fixed", epochs=1, workers=1)).runs[0]
    assert run.metrics["metrics"]["n"] == 153 and run.metrics["pretrained"] is False


def test_a_busy_load_average_does_not_change_the_thread_count(tmp_path, monkeypatch):
    # A load average trails by minutes: a run started right after another job must still use
    # torch's default thread count (here 2), not the 1 thread a load-based guess would give.
    data = make_dataset(tmp_path / "data", n_train=2, n_val=1)
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    torch.set_num_threads(2)  # torch's default on a 2-core machine; small_images restores it
    run = finetune.run(_cfg(data, tmp_path / "c", mode="fixed", epochs=1)).runs[0]
    assert run.metrics["config"]["threads"] == 2 and "(2 threads)" in run.summary()
    assert torch.get_num_threads() == 2


# --------------------------------------------------------------------------- nothing chosen on val


def test_final_epoch_is_the_result_when_the_best_val_epoch_beats_it(tiny_data, tmp_path):
    """On this tiny data set a from-random finetune run peaks on val at epoch 1 (1.0) and ends
    at 0.5: the tutorial would report 1.0. metrics.json, the summary and model.pt give the final
    epoch; the best-val epoch is only recorded, labelled."""
    run = finetune.run(_cfg(tiny_data, tmp_path / "c", epochs=4)).runs[0]
    val = [e["val_acc"] for e in _json(run.path, "history.json")["epochs"]]
    assert max(val) > val[-1], f"precondition: the best val epoch must beat the final one, got {val}"
    m = run.metrics
    assert m["metrics"]["accuracy"] == val[-1] and m["selection"]["selected_epoch"] == 4
    assert (m["best_val_epoch"], m["best_val_acc"]) == (val.index(max(val)) + 1, max(val))
    assert m["best_val_note"] == "best epoch on val: chosen on val, optimistic"
    assert f"val acc        {val[-1]:.4f}" in run.summary() and "chosen on val, optimistic" in run.summary()
    final, reported = _model(run.path, "last.pt"), _model(run.path, "model.pt")
    assert all(torch.equal(final[k], reported[k]) for k in final)  # the reusable file is the reported model
    assert not os.path.exists(os.path.join(run.path, "best.pt"))


def test_train_per_class_trains_on_a_seeded_stratified_subset(tiny_data, tmp_path):
    run = finetune.run(_cfg(tiny_data, tmp_path / "c", mode="fixed", epochs=1, train_per_class=2, seed=1)).runs[0]
    m = run.metrics
    assert run.path.endswith("fixed-k2-1") and m["train_per_class"] == 2 and m["train_images"] == 4
    subset = m["train_subset"]
    assert [p.split("/")[1] for p in subset] == ["ants", "ants", "bees", "bees"]
    again = finetune.run(_cfg(tiny_data, tmp_path / "d", mode="fixed", epochs=1, train_per_class=2, seed=1))
    assert again.runs[0].metrics["train_subset"] == subset
    other = finetune.run(_cfg(tiny_data, tmp_path / "d", mode="fixed", epochs=1, train_per_class=2, seed=2))
    assert other.runs[0].metrics["train_subset"] != subset


@pytest.mark.parametrize("every, with_val", [(0, [3]), (2, [2, 3]), (1, [1, 2, 3])])
def test_eval_every_sets_the_val_passes_and_they_are_timed_apart(tiny_data, tmp_path, every, with_val):
    run = finetune.run(_cfg(tiny_data, tmp_path / "c", mode="fixed", epochs=3, eval_every=every)).runs[0]
    history = _json(run.path, "history.json")["epochs"]
    assert [h["epoch"] for h in history if "val_acc" in h] == with_val
    m = run.metrics
    assert m["eval_seconds"] > 0 and m["eval_seconds"] == pytest.approx(sum(h.get("val_seconds", 0.0) for h in history))
    assert m["eval_seconds"] < m["total_seconds"] and m["best_val_epoch"] in with_val


def test_other_training_settings_get_their_own_folder(tiny_data, tmp_path):
    from pipeline.records import setting_digest

    cfg = _cfg(tiny_data, tmp_path / "c", mode="fixed", epochs=1)
    assert finetune.setting_tag(cfg) == "" and finetune.run_name("fixed", 0) == "fixed"
    changed = replace(cfg, lr=0.05, batch_size=2)
    tag = finetune.setting_tag(changed)
    assert tag == setting_digest(dict(backbone=None,  # the folder prefix names the backbone
                                      lr=0.05, batch_size=2, momentum=0.9, weight_decay=0.0,
                                      step_size=7, gamma=0.1, bn=cfg.bn, trainable_from=None,
                                      precision=cfg.precision))
    first = finetune.run(cfg).runs[0]
    second = finetune.run(changed).runs[0]
    assert first.path.endswith(os.sep + "fixed") and second.path.endswith(f"fixed-s{tag}")
    assert os.path.isfile(os.path.join(first.path, "metrics.json"))  # the first run is kept, not overwritten


def test_train_per_class_trains_on_the_curves_subset_of_that_k_and_seed(tiny_data, tmp_path):
    from pipeline import data
    from pipeline.data.splits import train_subset

    run = finetune.run(_cfg(tiny_data, tmp_path / "c", mode="fixed", epochs=1, train_per_class=3, seed=2)).runs[0]
    items = data.discover(str(tiny_data)).splits["train"][::-1]  # any order: keyed by path
    labels = [i.label for i in items]
    expected = sorted(items[i].relpath for i in train_subset(labels, 3, 2, keys=[i.relpath for i in items]))
    assert sorted(run.metrics["train_subset"]) == expected
