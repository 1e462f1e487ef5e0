"""Stage 3: end-to-end runs (fine-tuning, from scratch, fixed, partial).

``run(cfg)`` is the stage; ``loaders`` its data, ``checkpoints`` saving and resuming,
``result`` what a run returns."""
from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".stage": ["MODES", "BN_CHOICES", "TRAINABLE_FROM", "RunResult", "FinetuneResult", "run", "run_name",
               "run_dir", "Step", "train_one_epoch", "evaluate", "verify_checkpoint"],
})
