"""``python -m pipeline finetune``: end-to-end training runs (finetune, scratch, fixed, partial)."""
from __future__ import annotations

import argparse

from . import cli, config

__all__ = ["add_parser"]


def _seeds(text: str) -> tuple:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0,1,2")
    return tuple(cli.seed(str(s)) for s in seeds)


def add_parser(sub) -> None:
    d = config.FinetuneConfig()
    p = sub.add_parser(
        "finetune", help="train ResNet18 end to end: finetune | scratch | fixed | partial",
        description="End-to-end training with the reference protocol's defaults; outputs in "
                    "CACHE/runs/<mode>[-<seed>]/ (best.pt, last.pt, history.json, metrics.json). "
                    "An interrupted run resumes from last.pt when rerun with the same settings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli._common(p, d)
    p.add_argument("--mode", default=d.mode,
                   help="finetune: all layers from --weights; scratch: all layers from a seeded random "
                        "init (ignores --weights); fixed: frozen backbone, fc only; partial: freeze the "
                        "layers before --trainable-from")
    p.add_argument("--trainable-from", default=d.trainable_from, metavar="LAYER",
                   help="partial mode: first trainable stage, layer1 | layer2 | layer3 | layer4")
    p.add_argument("--bn", default=d.bn,
                   help="frozen-eval: frozen layers' BatchNorm stays in eval mode (running statistics "
                        "fixed); train: the tutorial's model.train() everywhere (statistics drift)")
    p.add_argument("--epochs", type=cli.integer, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=cli.integer, default=d.batch_size, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="SGD weight decay")
    p.add_argument("--step-size", type=cli.integer, default=d.step_size, help="StepLR: epochs between lr drops")
    p.add_argument("--gamma", type=float, default=d.gamma, help="StepLR: lr factor at each drop")
    p.add_argument("--seeds", type=_seeds, default=d.seeds, metavar="S1,S2,...",
                   help="run once per seed (directories <mode>-<seed>) and report mean ± std; overrides --seed")
    p.add_argument("--workers", type=cli.integer, default=d.workers, help="data-loading processes; -1: automatic")
    p.add_argument("--threads", type=cli.integer, default=d.threads,
                   help="CPU threads for the network; 0: automatic (the cores not already busy)")
    p.add_argument("--strict", action="store_true", help="an undecodable image is fatal instead of skipped")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory format")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or epoch lines")
    p.set_defaults(handler=_run)


def _run(args) -> None:
    from . import finetune

    result = finetune.run(cli._config(config.FinetuneConfig, args))
    print(result.summary())
