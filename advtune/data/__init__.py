"""Image datasets for attacks: ImageNet validation layouts, plain folders, the sample.

:func:`build_dataset` finds the layout of a folder, lists its images in a deterministic
order, and returns an :class:`ImageDataset` whose samples are the model's preprocessing
of each image, quantised to 8 bits (so an attacked image saved as PNG is exactly what was
attacked). :func:`make_loader` batches it.

Layouts (``ImageDataset.layout``):

``"imagenet-folders"``
    One folder per class named by WordNet id (``n01440764/...``); any subset of the 1000.
``"imagenet-loc-csv"``
    A flat folder of ``ILSVRC2012_val_*.JPEG`` with Kaggle's ``LOC_val_solution.csv``
    (in the folder, up to four levels above it, or given as ``labels``).
``"imagenet-devkit"``
    A flat folder with the devkit's ``ILSVRC2012_validation_ground_truth.txt`` and the
    devkit's id → WordNet id mapping (``meta.mat`` or ``devkit_wnids.txt``).
``"image-folder"``
    Any other folder of images (nested); unlabeled (label ``-1``).
``"sample"``
    The photos bundled with advtune (``root=None``); unlabeled.

Modules: ``shipped`` (data files shipped with advtune), ``decode`` (one image, safely),
``layouts`` (folder layouts and labels), ``subsets``, ``dataset`` (``ImageDataset``,
``build_dataset``), ``loader`` (``make_loader``). See ``docs/data_and_models.md`` for the
details and the decisions behind them.
"""

from advtune.data.constants import IMAGE_EXTENSIONS, Sample
from advtune.data.dataset import ImageDataset, build_dataset
from advtune.data.decode import MAX_IMAGE_PIXELS, SkipImage, decode_image
from advtune.data.loader import LOADER_TIMEOUT, collate_samples, make_loader
from advtune.data.shipped import imagenet_categories, imagenet_wnids, robustbench_subset, sample_dir
from advtune.data.subsets import resolve_subset_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "LOADER_TIMEOUT",
    "MAX_IMAGE_PIXELS",
    "ImageDataset",
    "Sample",
    "SkipImage",
    "build_dataset",
    "collate_samples",
    "decode_image",
    "imagenet_categories",
    "imagenet_wnids",
    "make_loader",
    "resolve_subset_path",
    "robustbench_subset",
    "sample_dir",
]
