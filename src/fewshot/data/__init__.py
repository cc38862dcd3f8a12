"""Datasets: labelled image records, image decoding, loaders and class-disjoint splits.

Public API::

    from fewshot.data import load_dataset, load_grocery_catalogue, load_image
    from fewshot.data import make_class_split, ClassSplit, protocol_sets, dataset_for
"""

from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, is_image_file, load_image
from .loaders import LAYOUTS, load_dataset, load_grocery_catalogue, parse_group_from, summarize
from .records import Dataset, ImageRecord
from .protocol import dataset_for, protocol_sets
from .splits import ClassSplit, make_class_split

__all__ = [
    "ClassSplit",
    "Dataset",
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "LAYOUTS",
    "MAX_IMAGE_PIXELS",
    "dataset_for",
    "is_image_file",
    "load_dataset",
    "load_grocery_catalogue",
    "load_image",
    "make_class_split",
    "parse_group_from",
    "protocol_sets",
    "summarize",
]
