"""The CIFAR model zoo of the KD benchmarks (RepDistiller / mdistiller), rewritten to the
:mod:`smskd_search.models.base` protocol. Importing a module registers its models."""

from smskd_search.models.cifar import mobilenetv2, resnet, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
