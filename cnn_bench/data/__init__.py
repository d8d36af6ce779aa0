"""The data path: datasets, decoding, caching, loaders and batch augmentation.

Importing this package registers every dataset (``cifar10_mini``, ``cifar10``, ``cifar100``,
``imagefolder``).
"""

from cnn_bench.data import bundled, imagefolder, torchvision_sets  # noqa: F401  (registers)
from cnn_bench.data.augment import BatchAugment
from cnn_bench.data.build import DataBundle, build_data
from cnn_bench.data.decode import decode_image, decode_resized
from cnn_bench.data.loader import Loader
from cnn_bench.data.registry import get_dataset, list_datasets, register_dataset

__all__ = [
    "BatchAugment",
    "DataBundle",
    "Loader",
    "build_data",
    "decode_image",
    "decode_resized",
    "get_dataset",
    "list_datasets",
    "register_dataset",
]
