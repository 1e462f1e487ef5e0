"""The backbone: the registry of networks, their weights, and the device and precision they run at."""
from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".registry": ["DEFAULT", "CHOICES", "Backbone", "get_backbone", "classifier_path", "feature_dim"],
    ".network": ["BACKBONE", "Weights", "resolve_weights", "imagenet_cache_file", "build_model", "feature_extractor",
                 "state_dict_sha256", "lite0_state_dict"],
    ".device": ["choose_device", "choose_precision", "supported_precision", "native_bf16", "cpu_features",
                "autocast", "has_kernels", "ieee_fp32", "NATIVE_BF16_ENV"],
})
