"""torchvision's ImageNet architectures in the zoo, under torchvision's own names (``resnet18``,
``resnet34``, ``resnet50``, ``mobilenet_v2``), with the feature taps the methods read.

Each model holds torchvision's own modules under torchvision's attribute names, so its state dict
is torchvision's: pretrained weights (torchvision's, or a local file of them) load unchanged, and
the logits are torchvision's forward, bit for bit. Importing a module registers its models.
"""

from smskd_search.models.imagenet import mobilenetv2, resnet  # noqa: F401
