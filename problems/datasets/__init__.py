"""Datasets for the MAE-family problems: CIFAR, Fashion-MNIST/MNIST (IDX files), small packaged
datasets, splits, batched augmentation (random crop + flip).

Every loader is deterministic in its ``seed`` and returns tensors (``TensorDataset``),
so problems and evaluations can be fed without worker processes.
"""
from .augment import augment_stream, random_crop_flip
from .cifar import (CIFAR_MEAN, CIFAR_RESOURCES, CIFAR_STD, CifarData, download_and_extract,
                    images_to_tensor, load_cifar, md5sum, safe_extract, write_cifar_like)
from .idx import (IDX_FILES, IDX_RESOURCES, IDX_SYSTEM_DIRS, IDXFormatError, MnistData,
                  find_mnist_like, load_mnist_like, read_idx, search_places, write_idx,
                  write_mnist_like)
from .small import (CMUDICT_VOCAB, encode_word, load_basic_motions, load_breast_cancer,
                    load_cmudict_syllables, load_digits)
from .splits import Splits, as_tensors, infinite_loader, loader, split, split_tensors, take

__all__ = [
    "random_crop_flip", "augment_stream",
    "load_cifar", "CifarData", "CIFAR_RESOURCES", "CIFAR_MEAN", "CIFAR_STD", "images_to_tensor",
    "download_and_extract", "safe_extract", "md5sum", "write_cifar_like",
    "load_mnist_like", "MnistData", "IDXFormatError", "IDX_RESOURCES", "IDX_FILES",
    "IDX_SYSTEM_DIRS", "find_mnist_like", "search_places", "read_idx", "write_idx", "write_mnist_like",
    "load_digits", "load_breast_cancer", "load_basic_motions", "load_cmudict_syllables",
    "CMUDICT_VOCAB", "encode_word",
    "Splits", "split", "split_tensors", "loader", "infinite_loader", "as_tensors", "take",
]
