"""End-to-end training benchmark: the tutorial's loop against this project's, side by side.

    python bench/finetune.py [--data DIR] [--modes fixed,finetune] [--epochs 1] [--subset N]
                             [--rounds R] [--device auto] [--json FILE]

For each mode, one process runs an epoch of the PyTorch transfer-learning tutorial's
``train_model`` loop (reimplemented in bench/tutorial.py, faithfully: ``ImageFolder``, ``DataLoader(batch 4,
shuffle, num_workers=4)``, ``model.train()``, ``loss.item()`` and ``torch.sum(preds ==
labels.data)`` every batch, a val phase under ``set_grad_enabled(False)``) and an epoch of
``python -m pipeline finetune`` (``pipeline.finetune.run``) on the same images, batch 4, same
device, interleaved (the order alternates between rounds) because these machines are shared
and noisy. Prints seconds per epoch (train + val phases) and the ratio project / tutorial.

Weights are random (no ImageNet download here): speed does not depend on the weight values,
and the accuracies printed are "not pretrained". ``--subset N`` keeps N images per class and
split (symlinks in a temporary folder) for a quicker run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import backbone, finetune  # noqa: E402
from pipeline.config import DEFAULT_DATA_DIR, FinetuneConfig  # noqa: E402
from tutorial import run_tutorial  # noqa: E402  (bench/ is on sys.path when run as a script)

def run_project(data_dir: str, mode: str, epochs: int, device: str, cache: str, threads: int) -> dict:
    started = time.perf_counter()
    cfg = FinetuneConfig(data=data_dir, cache=cache, weights="random", device=device, mode=mode,
                         epochs=epochs, progress=False, rebuild=True, threads=threads)
    m = finetune.run(cfg).runs[0].metrics
    return {"epoch_seconds": m["epoch_seconds"], "best_val_acc": m["metrics"]["accuracy"],
            "wall_seconds": time.perf_counter() - started, "workers": m["config"]["workers"],
            "precision": m["precision"], "threads": m["config"]["threads"]}


def subset_folder(data_dir: str, per_class: int, into: str) -> str:
    """``per_class`` images of every class and split (evenly spaced), as symlinks."""
    root = os.path.join(into, "subset")
    for split in ("train", "val"):
        for cls in sorted(os.listdir(os.path.join(data_dir, split))):
            src = os.path.join(data_dir, split, cls)
            if not os.path.isdir(src):
                continue
            files = sorted(f for f in os.listdir(src) if not f.startswith("."))
            step = max(1, len(files) // per_class)
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for name in files[::step][:per_class]:
                os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(root, split, cls, name))
    return root


def default_data() -> str:
    for candidate in (os.environ.get("BENCH_DATA"), os.environ.get("PIPELINE_TEST_DATA"), DEFAULT_DATA_DIR):
        if candidate and os.path.isdir(candidate):
            return candidate
    sys.exit("no data set: pass --data DIR (an ImageFolder with train/ and val/)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="data set (default: $BENCH_DATA, $PIPELINE_TEST_DATA or "
                                                f"{DEFAULT_DATA_DIR})")
    p.add_argument("--modes", default="fixed,finetune", help="comma-separated modes to time")
    p.add_argument("--epochs", type=int, default=1, help="epochs per loop")
    p.add_argument("--rounds", type=int, default=1, help="repetitions, alternating which loop goes first")
    p.add_argument("--subset", type=int, default=0, help="images per class and split; 0: all")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--project-threads", type=int, default=0,
                   help="the project's --threads; 0: its automatic choice (the tutorial keeps torch's default)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    return p


def main(args) -> int:
    # The tutorial asks for 4 loader processes whatever the machine; that is the baseline.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    data_dir = os.path.abspath(args.data or default_data())
    device = backbone.choose_device(args.device)
    state_dict = backbone.resolve_weights("random", 0).state_dict
    report = {"data": data_dir, "device": str(device), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "weights": "random (not pretrained)", "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.subset:
            data_dir = subset_folder(data_dir, args.subset, tmp)
        for mode in args.modes.split(","):
            rows = {"tutorial": [], "project": []}
            for r in range(args.rounds):
                order = ("tutorial", "project") if r % 2 == 0 else ("project", "tutorial")
                for side in order:
                    if side == "tutorial":
                        out = run_tutorial(data_dir, copy.deepcopy(state_dict), mode, args.epochs, device, tmp)
                    else:
                        out = run_project(data_dir, mode, args.epochs, args.device, os.path.join(tmp, "cache"),
                                          args.project_threads)
                    rows[side].append(out)
                    extra = (f" (wall {out['wall_seconds']:.1f} s with setup and final evaluation, "
                             f"{out['threads']} thread(s), {out['workers']} loader process(es))"
                             if side == "project" else f" ({torch.get_num_threads()} threads, 4 loader processes)")
                    print(f"  {mode:<9} round {r + 1} {side:<9} "
                          + ", ".join(f"{s:.1f}" for s in out["epoch_seconds"]) + " s/epoch" + extra, flush=True)
            tut = statistics.mean(s for o in rows["tutorial"] for s in o["epoch_seconds"])
            proj = statistics.mean(s for o in rows["project"] for s in o["epoch_seconds"])
            report["modes"][mode] = {"tutorial_s_per_epoch": tut, "project_s_per_epoch": proj,
                                     "ratio": proj / tut, "runs": rows}
    print(f"\nend-to-end training, {report['device']}, {report['threads']} threads, batch 4, "
          f"{args.epochs} epoch(s) x {args.rounds} round(s), data {args.data or default_data()}"
          f"{f' (subset {args.subset}/class/split)' if args.subset else ''}, weights random (not pretrained)")
    print(f"{'mode':<10} {'tutorial s/epoch':>17} {'project s/epoch':>16} {'ratio':>7}")
    for mode, r in report["modes"].items():
        print(f"{mode:<10} {r['tutorial_s_per_epoch']:>17.1f} {r['project_s_per_epoch']:>16.1f} {r['ratio']:>7.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
