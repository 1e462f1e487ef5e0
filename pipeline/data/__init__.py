"""Image discovery, robust decoding, transforms, datasets and train/holdout splits."""
from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".imagefolder": ["Item", "DataSet", "discover", "eval_transform", "train_transform", "describe_transforms",
                     "seeded", "ImageDataset", "ExtractionDataset"],
    ".images": ["is_image_file", "checked_utf8", "walk_images", "collect_images", "decode_image", "load_image",
                "eval_array", "INTERPOLATIONS"],
    ".splits": ["per_class_subset", "holdout_split"],
})
