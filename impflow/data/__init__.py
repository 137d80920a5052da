"""Data for the experiments of the ImpFlow paper: 2-D toy densities, the 1-D fitting example,
the tabular benchmarks of the MAF release, and images (scikit-learn digits, CIFAR-10)
(DESIGN.md §4). Optional packages (scikit-learn, pandas, h5py) are imported only by the
loaders that need them."""

from impflow.data.fit1d import (
    FIT1D_DOMAIN,
    FIT1D_SLOPE_RANGE,
    fit1d_dataset,
    fit1d_derivative,
    fit1d_target,
)
from impflow.data.images import (
    CIFAR10_FILES,
    IMAGE_DATASETS,
    ImageData,
    dequantize,
    load_cifar10,
    load_digits,
    load_images,
)
from impflow.data.tabular import TABULAR_DATASETS, TABULAR_FILES, TabularData, load_tabular
from impflow.data.toy import (
    TOY_DATASETS,
    checkerboard_entropy,
    checkerboard_log_prob,
    sample_toy,
)

__all__ = [
    "CIFAR10_FILES",
    "FIT1D_DOMAIN",
    "FIT1D_SLOPE_RANGE",
    "IMAGE_DATASETS",
    "ImageData",
    "TABULAR_DATASETS",
    "TABULAR_FILES",
    "TOY_DATASETS",
    "TabularData",
    "checkerboard_entropy",
    "checkerboard_log_prob",
    "dequantize",
    "fit1d_dataset",
    "fit1d_derivative",
    "fit1d_target",
    "load_cifar10",
    "load_digits",
    "load_images",
    "load_tabular",
    "sample_toy",
]
