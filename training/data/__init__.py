"""COCO folders and Hub detection datasets -> one ``datasets.Dataset`` schema; the check; the collate for DETR.

    COCO folder (coco.py, Arrow-cached) / Hub dataset (hub.py)
      --> datasets.Dataset (schema.py): image, image_id, width, height, objects{id, bbox, category_id, area,
          iscrowd}, carrying its categories (get_categories)
      --check.py--> the rows to train on, and a DatasetReport of what was skipped
      --collate.py: training.transforms, then DetrCustomImageProcessor--> pixel_values, pixel_mask, labels

images.py opens undecoded images lazily, for the Hub loader, the check and the collate.
"""
from .check import AUTO_DECODE_MAX_IMAGES, BOX_PROBLEMS, CHECK_IMAGES, IMAGE_PROBLEMS, DatasetReport, \
    check_dataset, check_same_categories
from .coco import CACHE_VERSION, build_coco_dataset, load_coco
from .collate import DetrCollator
from .hub import BBOX_FORMATS, HUB_COLUMNS, VALIDATION_SPLITS, choose_split, load_hub_detection, normalize_hub_dataset
from .schema import DETECTION_FEATURES, Categories, get_categories, get_load_problems, get_split, set_categories

__all__ = [
    "DETECTION_FEATURES",
    "Categories",
    "get_categories",
    "set_categories",
    "get_load_problems",
    "get_split",
    "CACHE_VERSION",
    "load_coco",
    "build_coco_dataset",
    "HUB_COLUMNS",
    "BBOX_FORMATS",
    "VALIDATION_SPLITS",
    "choose_split",
    "load_hub_detection",
    "normalize_hub_dataset",
    "IMAGE_PROBLEMS",
    "CHECK_IMAGES",
    "AUTO_DECODE_MAX_IMAGES",
    "BOX_PROBLEMS",
    "DatasetReport",
    "check_dataset",
    "check_same_categories",
    "DetrCollator",
]
