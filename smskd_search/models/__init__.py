"""Model zoo by name. Every model returns ``(logits, Features)``; see :mod:`.base`."""

from smskd_search.models import (
    cifar,  # noqa: F401  (registers the CIFAR benchmark zoo)
    imagenet,  # noqa: F401  (registers torchvision's ImageNet architectures)
    small_cnn,  # noqa: F401  (registers the small CNNs)
)
from smskd_search.models.base import (
    MODELS,
    Features,
    FeatureShapes,
    ZooModel,
    count_parameters,
    create_model,
    probe_shapes,
    register_model,
)

__all__ = [
    "MODELS",
    "Features",
    "FeatureShapes",
    "ZooModel",
    "count_parameters",
    "create_model",
    "probe_shapes",
    "register_model",
]
