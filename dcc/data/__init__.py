"""Data: sources of images/masks, augmented datasets, and the embedded digit scenes."""

from dcc.data.datasets import ArraySource, LabeledDataset, Source, UnlabeledPairDataset, crop_iou
from dcc.data.digits import NUM_CLASSES, generate_digit_scenes, load_digit_scenes

__all__ = [
    "NUM_CLASSES",
    "ArraySource",
    "LabeledDataset",
    "Source",
    "UnlabeledPairDataset",
    "crop_iou",
    "generate_digit_scenes",
    "load_digit_scenes",
]
