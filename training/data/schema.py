"""The one schema every loader returns, and the categories that travel with it.

Rows have the features ``DETECTION_FEATURES``:

    image      datasets Image, decoded lazily (rows store the file path, not the pixels)
    image_id   int64, as in the source
    width, height   int32, as declared by the source
    objects    dict of lists: id int64, bbox float32 [x, y, w, h] absolute pixels, category_id int64
               (the source's own ids, e.g. COCO's 1..90 with gaps), area float32, iscrowd int8

The categories are stored in ``dataset.info.description``, so they survive ``map``/``select``/``save_to_disk``:
``get_categories(dataset)`` gives ``id2label``/``label2id`` over contiguous labels 0..K-1 (sorted by category id)
and the ``category_id`` <-> label mappings. Evaluation reports in the source's ids.
"""
import json
from dataclasses import dataclass

import datasets

DETECTION_FEATURES = datasets.Features({
    "image": datasets.Image(),
    "image_id": datasets.Value("int64"),
    "width": datasets.Value("int32"),
    "height": datasets.Value("int32"),
    "objects": datasets.Sequence({
        "id": datasets.Value("int64"),
        "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
        "category_id": datasets.Value("int64"),
        "area": datasets.Value("float32"),
        "iscrowd": datasets.Value("int8"),
    }),
})
_CATEGORIES_KEY = "detr_custom_categories"
_LOAD_PROBLEMS_KEY = "detr_custom_load_problems"
_SPLIT_KEY = "detr_custom_split"


@dataclass(frozen=True)
class Categories:
    """The dataset's categories; labels are contiguous 0..K-1 in the order of increasing category id."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_list(cls, categories: list[dict]) -> "Categories":
        """From COCO's ``[{"id", "name"}, ...]`` in any order; the ids must be unique."""
        ordered = sorted(categories, key=lambda c: int(c["id"]))
        ids = tuple(int(c["id"]) for c in ordered)
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate category ids {repeated} in the categories {ids}: each category needs its "
                             "own id")
        names = tuple(str(c["name"]) for c in ordered)
        if len(set(names)) != len(names):   # label2id would keep one of them: two classes under one name
            repeated = {n: [i for i, m in zip(ids, names) if m == n] for n in names if names.count(n) > 1}
            listed = ", ".join(f"{n!r} (ids {i})" for n, i in repeated.items())
            raise ValueError(f"categories with the same name: {listed}: give each category its own name, or merge "
                             "them into one id")
        return cls(ids, names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: label for label, name in enumerate(self.names)}

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {category_id: label for label, category_id in enumerate(self.ids)}

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return dict(enumerate(self.ids))


def _description(dataset: datasets.Dataset) -> dict:
    try:
        payload = json.loads(dataset.info.description or "")
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def set_categories(dataset: datasets.Dataset, categories: Categories) -> datasets.Dataset:
    """Stores the categories on the dataset (in place) and returns it."""
    payload = [{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)]
    dataset.info.description = json.dumps({**_description(dataset), _CATEGORIES_KEY: payload})
    return dataset


def set_load_problems(dataset: datasets.Dataset, problems: dict) -> datasets.Dataset:
    """Stores what the loader found but could not put in rows (in place): ``{problem: {"count", "examples"}}``,
    e.g. annotations whose image id is not in the file's images. ``check_dataset`` reports them."""
    dataset.info.description = json.dumps({**_description(dataset), _LOAD_PROBLEMS_KEY: problems})
    return dataset


def get_load_problems(dataset: datasets.Dataset) -> dict:
    """What ``set_load_problems`` stored, or {}."""
    return _description(dataset).get(_LOAD_PROBLEMS_KEY, {})


def set_split(dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    """Stores the name of the source's split the rows came from (in place), e.g. "test" where a validation split
    was asked for and the source has only train and test."""
    dataset.info.description = json.dumps({**_description(dataset), _SPLIT_KEY: split})
    return dataset


def get_split(dataset: datasets.Dataset) -> str | None:
    """What ``set_split`` stored, or None (a COCO file, or every split of a Hub dataset)."""
    return _description(dataset).get(_SPLIT_KEY)


def get_categories(dataset: datasets.Dataset | datasets.DatasetDict) -> Categories:
    """The categories stored by ``load_coco`` / ``load_hub_detection`` on the dataset (or its first split)."""
    if isinstance(dataset, datasets.DatasetDict):
        dataset = next(iter(dataset.values()))
    try:
        payload = json.loads(dataset.info.description or "")[_CATEGORIES_KEY]
    except (ValueError, KeyError, TypeError):
        raise ValueError("this dataset has no categories: load it with load_coco or load_hub_detection") from None
    return Categories.from_list(payload)
