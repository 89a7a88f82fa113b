"""The names of the built-in models and datasets, known without importing torch (``prune-env list``).

:mod:`prune_env.models` and :mod:`prune_env.data` build what these name; a test holds the lists equal.
"""

from __future__ import annotations

ZOO_MODELS = (
    "mobilenetv2",
    "mobilenetv2_half",
    "resnet110",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "tiny",
    "vgg11",
    "vgg11_quarter",
    "vgg16",
    "vgg19",
)
DATASET_NAMES = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "fake")
