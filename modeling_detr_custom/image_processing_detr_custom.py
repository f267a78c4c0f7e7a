"""DetrCustomImageProcessor: images + COCO detection annotations -> pixel_values, pixel_mask, labels.

Conventions (docs/ARCHITECTURE.md):
- ``pixel_mask`` is 1 on real pixels and 0 on padding (the HF polarity; DETR's NestedTensor mask is the reverse).
- label boxes are ``(center_x, center_y, width, height)`` normalized by the *visible* (resized, unpadded) image,
  as in the original DETR (facebookresearch/detr#286), not by the padded batch size as transformers does since
  transformers#28363. The sine position encoding normalizes over the unmasked region, so this is what the model sees.

This file is the public API: the processor, its settings and the size rule. The pixel work (conversion to RGB,
uint8 resize, normalizing straight into the padded batch) is in ``image_kernels.py``; annotation validation and
label building in ``annotations_detr_custom.py``.
"""
import json
import math
import numbers
import os
from types import SimpleNamespace

import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .annotations_detr_custom import make_labels, parse_annotations
from .box_ops import box_cxcywh_to_xyxy, class_wise_nms
from .configuration_detr_custom import SIGMOID_CLASSIFICATION_LOSSES
from .image_kernels import to_padded_batch, to_rgb_tensor

# post_process_object_detection: how the class head's logits become scores, and the sigmoid head's default top-k
# over queries x classes (Deformable DETR's)
CLASS_ACTIVATIONS = ("softmax", "sigmoid")
SIGMOID_TOP_K = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling ids (what preprocessor_config.json stores) -> torch interpolate modes
_RESAMPLE_TO_MODE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
# transformers-only keys that we accept when reading their preprocessor_config.json, and ignore
_IGNORED_TRANSFORMERS_KEYS = (
    "image_processor_type", "feature_extractor_type", "processor_class", "_processor_class", "do_convert_rgb",
    "data_format", "input_data_format", "device", "disable_grouping", "return_tensors", "default_to_square",
    "do_center_crop", "crop_size", "return_segmentation_masks", "masks_path", "image_seq_length", "backend",
)


class DetrCustomImageProcessorKwargs(ImagesKwargs, total=False):
    # the keys `from_pretrained(..., key=value)` may override, beyond transformers' own
    do_convert_annotations: bool
    drop_crowd: bool
    category_id_to_label: dict
    class_activation: str
    nms_iou_threshold: float


# the constructor's settings; preprocess(..., key=value) overrides one for a call
_SETTINGS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
             "image_std", "do_pad", "pad_size", "do_convert_annotations", "drop_crowd", "category_id_to_label")
# the forms a standardized `size` dict takes
_SIZE_KINDS = (("shortest_edge", "longest_edge"), ("shortest_edge",), ("height", "width"), ("max_height", "max_width"))


def _standardize_size(size, max_size=None) -> dict:
    """int / dict / SizeDict -> one of {shortest_edge[, longest_edge]}, {height, width}, {max_height, max_width}."""
    if isinstance(size, numbers.Integral):  # old DETR configs: "size": 800, "max_size": 1333
        size = {"shortest_edge": int(size), "longest_edge": max_size}
    size = {k: v for k, v in dict(size).items() if v is not None}
    for keys in _SIZE_KINDS:
        if set(size) == set(keys) and all(isinstance(size[k], numbers.Integral) and size[k] > 0 for k in keys):
            return {k: int(size[k]) for k in keys}
    raise ValueError(
        'size must be {"shortest_edge": int, "longest_edge": int}, {"height": int, "width": int} or '
        f'{{"max_height": int, "max_width": int}} with positive values, got {size}'
    )


def get_resize_output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """Output (height, width) for an input of (height, width) under a standardized `size` dict: the one resize rule
    of this package (the processor and training/transforms.py's augmentations both use it).

    With ``{"shortest_edge"[, "longest_edge"]}``: the shortest edge becomes ``shortest_edge`` unless the longest edge
    would then exceed ``longest_edge``; the shortest edge is then the rounded ``longest_edge * short / long``. Rounds
    as transformers' get_size_with_aspect_ratio (DetrImageProcessor): the long side is scaled from the unrounded short
    side, so it never exceeds ``longest_edge``. facebookresearch/detr's datasets/transforms.py scales it from the
    rounded one and differs there only, by a pixel or more: (height, width) (30, 90) with shortest_edge 96,
    longest_edge 224 -> (75, 224) here, (75, 225) in the original.
    """
    if "height" in size:  # exact size, aspect ratio not kept (as transformers' DETR does)
        return size["height"], size["width"]
    if "max_height" in size:  # largest size that fits, aspect ratio kept (may upscale)
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return max(1, int(height * scale)), max(1, int(width * scale))
    short, long_edge = size["shortest_edge"], size.get("longest_edge")
    raw_short = None
    if long_edge is not None and max(height, width) / min(height, width) * short > long_edge:
        raw_short = long_edge * min(height, width) / max(height, width)
        short = int(round(raw_short))
        if short == 0:  # so elongated that the short side rounds to 0 (both references then fail): keep one pixel
            return (1, long_edge) if height < width else (long_edge, 1)
    if min(height, width) == short:
        return height, width
    base = raw_short if raw_short is not None else short
    if width < height:
        return max(1, int(base * height / width)), short
    return short, max(1, int(base * width / height))


class DetrCustomImageProcessor(BaseImageProcessor):
    r"""Image processor for DETR: resize, rescale, normalize, pad, pixel mask, COCO labels, post-processing.

    ``processor(images, annotations=None, return_tensors="pt")`` returns a ``BatchFeature`` with

    - ``pixel_values`` ``[batch, 3, height, width]`` float32, padded bottom/right to the largest image (or to
      ``pad_size``);
    - ``pixel_mask`` ``[batch, height, width]`` int64, **1 on real pixels, 0 on padding**;
    - ``labels`` (when annotations are given): one dict per image with ``class_labels`` int64 ``[n]``, ``boxes``
      float32 ``[n, 4]`` as ``(center_x, center_y, width, height)`` **normalized by the visible resized image, not the
      padded one**, ``area`` (rescaled to the resized image), ``iscrowd``, ``orig_size`` and ``size`` (height, width
      before and after resizing, unpadded), ``image_id`` ``[1]``, ``num_dropped_boxes`` (0-d int64): how many
      boxes had zero width or height after clipping to the image and were dropped, and ``num_dropped_crowd``
      (0-d int64): how many other boxes were crowd regions left out under ``drop_crowd``.

    Images: PIL images (any common mode: L, LA, P, RGBA, CMYK, I;16 ... become RGB, alpha composited on white, EXIF
    orientation applied), numpy arrays or torch tensors, HWC or CHW (2-D = grayscale), uint8 in 0..255 or float in
    [0, 1]. Float images are taken as already rescaled: ``rescale_factor`` only applies to uint8 data. When a 3-D
    array's layout is ambiguous (both first and last dims could be channels) numpy arrays are read as HWC and torch
    tensors as CHW; pass ``input_data_format`` to say otherwise.

    Annotations: COCO detection dicts ``{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int,
    "area": float, "iscrowd": 0 or 1}]}``, one per image; ``image_id`` is required, as in transformers. Ids may be
    numpy/torch integers, integral floats (3.0, as albumentations returns) or, for ``image_id``, numeric strings;
    boxes may be lists, numpy arrays or tensors. Boxes are clipped to the image; boxes with zero width or height after
    clipping are dropped (and counted). Crowd regions (``iscrowd`` = 1) are dropped from the labels (and counted), as
    transformers' DetrImageProcessor and facebookresearch/detr do: they are not objects to detect, and COCO
    evaluation ignores detections on them. ``drop_crowd=False`` keeps them, with ``iscrowd`` = 1.
    ``category_id_to_label`` maps dataset category ids to contiguous class labels. ``iscrowd`` may also be a bool.

    ``class_activation`` (None, ``"softmax"`` or ``"sigmoid"``) says how ``post_process_object_detection`` reads
    logits whose outputs do not say it themselves; ``save_pretrained`` into a folder that holds the model's
    config.json stores the model's activation, and ``from_pretrained`` fills it from that config.json for folders
    saved without it (see ``get_image_processor_dict``).

    ``nms_iou_threshold`` (None: off, the default) makes ``post_process_object_detection`` remove duplicates: of two
    detections of one class whose boxes overlap with an IoU above it, the lower-scored one (class-wise non-maximum
    suppression). DETR's one-to-one matching teaches the model not to give duplicates, which a model trained on
    few images or for few steps has not fully learned; `training/configs/finetune_small.yaml` sets 0.7.

    Reads transformers' DETR ``preprocessor_config.json`` (``DetrImageProcessor``, ``DetrImageProcessorFast``, old
    ``DetrFeatureExtractor`` with ``size: 800, max_size: 1333``).
    """

    valid_kwargs = DetrCustomImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(
        self,
        do_resize: bool = True,
        size=None,
        resample: int = 2,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_pad: bool = True,
        pad_size=None,
        do_convert_annotations: bool = True,
        drop_crowd: bool = True,
        category_id_to_label: dict | None = None,
        class_activation: str | None = None,
        nms_iou_threshold: float | None = None,
        **kwargs,
    ):
        # transformers' DETR configs: old names and keys that mean nothing here
        if "pad_and_return_pixel_mask" in kwargs:
            do_pad = kwargs.pop("pad_and_return_pixel_mask")
        max_size = kwargs.pop("max_size", None)
        annotation_format = kwargs.pop("format", "coco_detection")
        if str(getattr(annotation_format, "value", annotation_format)) != "coco_detection":
            raise ValueError(f"only format='coco_detection' is supported, got {annotation_format!r}")
        for key in _IGNORED_TRANSFORMERS_KEYS:
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = _standardize_size({"shortest_edge": 800, "longest_edge": 1333} if size is None else size,
                                      max_size=1333 if max_size is None else max_size)
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_pad = do_pad
        self.pad_size = None if pad_size is None else dict(pad_size)
        self.do_convert_annotations = do_convert_annotations
        self.drop_crowd = drop_crowd
        # JSON turns int keys into strings: bring them back
        self.category_id_to_label = (
            None if category_id_to_label is None else {int(k): int(v) for k, v in category_id_to_label.items()}
        )
        if class_activation not in (None, *CLASS_ACTIVATIONS):
            raise ValueError(f"class_activation must be one of {CLASS_ACTIVATIONS} or None, got {class_activation!r}")
        self.class_activation = class_activation
        self.nms_iou_threshold = checked_nms_iou_threshold(nms_iou_threshold)
        self._check_settings(self)

    @classmethod
    def get_image_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' loading, plus `class_activation` from the model's config.json next to the processor's when
        the processor's does not say it (folders saved before the setting, or with None). A processor that says the
        other activation than its model is a clear error. `AutoImageProcessor` (transformers >= 5.25) reads the file
        without calling this: `save_pretrained` therefore writes the activation into the folder (see there)."""
        processor_dict, kwargs = super().get_image_processor_dict(pretrained_model_name_or_path, **kwargs)
        from transformers.utils import cached_file

        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "subfolder", "token", "local_files_only")
                      if kwargs.get(k) is not None}
        config_file = cached_file(pretrained_model_name_or_path, "config.json",
                                  _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if config_file is not None:
            processor_dict["class_activation"] = _activation_agreeing_with_model(
                processor_dict.get("class_activation"), config_file, pretrained_model_name_or_path)
        return processor_dict, kwargs

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' saving; a processor whose `class_activation` is None, saved into a folder that already holds
        its model's config.json (`model.save_pretrained(d)` first, as Trainer and our training script do), stores the
        model's activation, so that `pipeline("object-detection", model=d)` and `AutoImageProcessor` post-process a
        sigmoid model with sigmoid on every transformers version. A stored activation that contradicts the model's is
        the same error as at loading."""
        config_file = os.path.join(save_directory, "config.json")
        if not os.path.isfile(config_file):
            return super().save_pretrained(save_directory, *args, **kwargs)
        activation = _activation_agreeing_with_model(self.class_activation, config_file, save_directory)
        saved, self.class_activation = self.class_activation, activation
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.class_activation = saved

    @staticmethod
    def _check_settings(settings):
        """`settings`: the processor itself, or one call's settings (`_settings_for_call`)."""
        if settings.resample not in _RESAMPLE_TO_MODE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE_TO_MODE)} (PIL NEAREST, BILINEAR, BICUBIC), "
                             f"got {settings.resample}")
        if settings.pad_size is not None and set(settings.pad_size) != {"height", "width"}:
            raise ValueError(f'pad_size must be {{"height": int, "width": int}}, got {settings.pad_size}')
        mean, std = settings.image_mean, settings.image_std
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"image_mean and image_std need 3 values (std > 0), got {mean} and {std}")

    def _settings_for_call(self, overrides: dict) -> SimpleNamespace:
        """The processor's settings, with those given to this call (not None) in their place, checked."""
        unknown = sorted(set(overrides) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"preprocess() got unexpected keyword arguments {unknown}; settings are {_SETTINGS}")
        settings = {key: getattr(self, key) if overrides.get(key) is None else overrides[key] for key in _SETTINGS}
        if overrides.get("size") is not None:
            settings["size"] = _standardize_size(overrides["size"], max_size=self.size.get("longest_edge"))
        settings["resample"] = int(settings["resample"])
        settings = SimpleNamespace(**settings)
        self._check_settings(settings)
        return settings

    def preprocess(self, images, annotations=None, return_tensors="pt", *, input_data_format: str | None = None,
                   **overrides) -> BatchFeature:
        """Process one image or a list of images (and their COCO annotations); see the class docstring.

        Any of the constructor's settings (``do_resize``, ``size``, ``resample``, ``do_rescale``, ``rescale_factor``,
        ``do_normalize``, ``image_mean``, ``image_std``, ``do_pad``, ``pad_size``, ``do_convert_annotations``,
        ``drop_crowd``, ``category_id_to_label``) given here applies to this call only; None keeps the processor's.
        """
        settings = self._settings_for_call(overrides)
        if return_tensors not in (None, "pt") and str(getattr(return_tensors, "value", return_tensors)) != "pt":
            raise ValueError(f"return_tensors must be 'pt' or None (torch tensors either way), got {return_tensors!r}")

        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("images is empty: pass at least one image")
        if annotations is not None:  # validated before touching pixels: bad data fails fast
            parsed = parse_annotations(annotations, len(images), settings.category_id_to_label)

        tensors = [to_rgb_tensor(image, i, input_data_format) for i, image in enumerate(images)]
        orig_sizes = [tuple(t.shape[-2:]) for t in tensors]
        new_sizes = [get_resize_output_size(h, w, settings.size) if settings.do_resize else (h, w)
                     for h, w in orig_sizes]

        pad_size = settings.pad_size
        if settings.do_pad:
            pad_h, pad_w = max(h for h, _ in new_sizes), max(w for _, w in new_sizes)
            if pad_size is not None:
                pad_h, pad_w = pad_size["height"], pad_size["width"]
                for i, (h, w) in enumerate(new_sizes):
                    if h > pad_h or w > pad_w:
                        raise ValueError(f"image {i} is {h}x{w} after resizing, larger than pad_size {pad_size}")
        elif len(set(new_sizes)) > 1:
            raise ValueError(f"do_pad=False needs images of one size after resizing, got {sorted(set(new_sizes))}")
        else:
            pad_h, pad_w = new_sizes[0]

        mean, std = (settings.image_mean, settings.image_std) if settings.do_normalize else (None, None)
        pixel_values, pixel_mask = to_padded_batch(
            tensors, new_sizes, (pad_h, pad_w), _RESAMPLE_TO_MODE[settings.resample],
            settings.rescale_factor if settings.do_rescale else 1.0, mean, std, with_mask=settings.do_pad)

        data = {"pixel_values": pixel_values}
        if pixel_mask is not None:
            data["pixel_mask"] = pixel_mask
        batch = BatchFeature(data=data)
        if annotations is not None:
            batch["labels"] = [
                make_labels(p, orig, new, settings.drop_crowd, settings.do_convert_annotations)
                for p, orig, new in zip(parsed, orig_sizes, new_sizes)
            ]
        return batch

    def post_process_object_detection(self, outputs, threshold: float = 0.5, target_sizes=None, top_k=None,
                                      class_activation: str | None = None, nms_iou_threshold: float | None = None):
        """Raw outputs -> one dict per image: ``scores`` [k], ``labels`` [k], ``boxes`` [k, 4] absolute x0, y0, x1, y1.

        ``outputs`` has ``logits`` and ``pred_boxes`` [batch, queries, 4] (cx, cy, w, h in [0, 1] of the visible
        image). Boxes are scaled to each image's ``target_sizes`` (height, width) - a [batch, 2] tensor or a list of
        pairs - and clipped to it (to [0, 1] when no target size is given).

        How scores are read follows the class head: ``class_activation`` if given, else the outputs' own
        (``type(outputs).class_activation``, which our model's output classes carry), else the processor's
        ``class_activation`` (set from the model's config.json by ``from_pretrained``: ``pipeline("object-detection")``
        rebuilds the outputs as a plain ``ModelOutput``), else softmax. A ``class_activation`` that contradicts the
        outputs' own is an error.

        - ``"softmax"``: ``logits`` [batch, queries, num_labels + 1] (last = no object); each query's best class,
          kept when its score > ``threshold``, in query order; with ``top_k``, the ``top_k`` best of them, best first.
        - ``"sigmoid"`` (focal / varifocal heads): ``logits`` [batch, queries, num_labels]; the ``top_k`` (default
          100) best (query, class) pairs over queries x classes, best first, then those with score > ``threshold``,
          as Deformable DETR (a query may give several classes).

        Then, with ``nms_iou_threshold`` (this call's, else the processor's; None in both: off), class-wise
        non-maximum suppression on what was kept: a detection is removed when a higher-scored one of its class
        overlaps it with an IoU above the threshold (the order of the rest is kept). 1.0 turns off the processor's.
        """
        if isinstance(threshold, bool) or not (isinstance(threshold, numbers.Real) and 0 <= threshold <= 1):
            raise ValueError(f"threshold is a score in [0, 1] (0 keeps every query), got {threshold!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        activation = _class_activation(outputs, class_activation, self.class_activation)
        nms_iou_threshold = checked_nms_iou_threshold(nms_iou_threshold)
        nms_iou_threshold = self.nms_iou_threshold if nms_iou_threshold is None else nms_iou_threshold
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        pred_boxes = outputs["pred_boxes"] if isinstance(outputs, dict) else outputs.pred_boxes
        boxes_xyxy = box_cxcywh_to_xyxy(pred_boxes)                              # [batch, queries, 4], in [0, 1]
        if target_sizes is not None:
            sizes = torch.as_tensor(target_sizes if not isinstance(target_sizes, list)
                                    else [list(s) for s in target_sizes]).to(boxes_xyxy)
            if sizes.ndim != 2 or sizes.shape != (len(logits), 2):
                raise ValueError(f"target_sizes must hold one (height, width) per image: {len(logits)} pairs, got "
                                 f"shape {tuple(sizes.shape)}")
            if not torch.isfinite(sizes).all() or (sizes <= 0).any():
                bad = [i for i, size in enumerate(sizes.tolist()) if not all(math.isfinite(v) and v > 0 for v in size)]
                raise ValueError(f"target_sizes must be positive (height, width) pairs, the original image sizes; "
                                 f"image {bad[0]} has {tuple(sizes[bad[0]].tolist())}")
            height, width = sizes.unbind(1)                                      # [batch]
        else:
            height = width = torch.ones(len(logits), dtype=boxes_xyxy.dtype, device=boxes_xyxy.device)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]   # [batch, 1, 4]
        boxes_xyxy = torch.minimum((boxes_xyxy * scale).clamp(min=0), scale)
        if activation == "sigmoid":
            results = _sigmoid_top_k(logits, boxes_xyxy, threshold, SIGMOID_TOP_K if top_k is None else top_k)
            return suppress_duplicates(results, nms_iou_threshold)
        probs = logits.softmax(-1)[..., :-1]                                     # [batch, queries, num_labels]
        scores, labels = probs.max(-1)                                           # [batch, queries]
        results = []
        for image_scores, image_labels, image_boxes in zip(scores, labels, boxes_xyxy):
            keep = image_scores > threshold
            image_scores, image_labels, image_boxes = image_scores[keep], image_labels[keep], image_boxes[keep]
            if top_k is not None:
                order = image_scores.argsort(descending=True)[:top_k]
                image_scores, image_labels, image_boxes = image_scores[order], image_labels[order], image_boxes[order]
            results.append({"scores": image_scores, "labels": image_labels, "boxes": image_boxes})
        return suppress_duplicates(results, nms_iou_threshold)


def checked_nms_iou_threshold(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 < value <= 1):
        raise ValueError(f"nms_iou_threshold is an IoU in (0, 1] (non-maximum suppression: a detection overlapping a "
                         f"higher-scored one of its class by more is removed; 1 keeps all) or None (off), got "
                         f"{value!r}")
    return float(value)


def suppress_duplicates(results: list[dict], nms_iou_threshold: float | None) -> list[dict]:
    """Post-processed detections (one dict of ``scores``, ``labels``, ``boxes`` per image) without the duplicates
    that class-wise non-maximum suppression at `nms_iou_threshold` removes; unchanged when it is None."""
    if nms_iou_threshold is None:
        return results
    kept = []
    for result in results:
        keep = class_wise_nms(result["boxes"], result["scores"], result["labels"], nms_iou_threshold)
        kept.append({**result, **{key: result[key][keep] for key in ("scores", "labels", "boxes")}})
    return kept


def _activation_agreeing_with_model(activation: str | None, config_file: str, where) -> str:
    """The class activation of the model whose config.json is `config_file`; `activation` (a processor's setting) must
    be None or the same."""
    with open(config_file) as f:
        model_config = json.load(f)
    loss = model_config.get("classification_loss", "cross_entropy")
    if model_config.get("model_type") in ("rt_detr", "rt_detr_v2"):   # transformers' RT-DETR folders: focal head
        loss = "focal" if model_config.get("use_focal_loss", True) else "cross_entropy"
    model_activation = "sigmoid" if loss in SIGMOID_CLASSIFICATION_LOSSES else "softmax"
    if activation is not None and activation != model_activation:
        raise ValueError(
            f"{where}: the image processor's class_activation={activation!r} but the model's config.json has "
            f"classification_loss={loss!r}, a {model_activation} class head; scores would mean nothing. Set "
            f"class_activation to {model_activation!r} or null in preprocessor_config.json.")
    return model_activation


def _class_activation(outputs, requested: str | None, processor_setting: str | None) -> str:
    """How to read the logits (see post_process_object_detection). The outputs' own activation, when they carry one,
    is the truth: a caller's choice that contradicts it is an error rather than scores that mean nothing, and the
    processor's setting is only the fallback for outputs that do not carry it."""
    carried = getattr(type(outputs), "class_activation", None)
    if requested is not None and requested not in CLASS_ACTIVATIONS:
        raise ValueError(f"class_activation must be one of {CLASS_ACTIVATIONS} or None (follow the outputs), got "
                         f"{requested!r}")
    if requested is not None and carried is not None and requested != carried:
        raise ValueError(f"class_activation={requested!r}, but these outputs come from a {carried} class head "
                         f"({type(outputs).__name__}): leave class_activation=None to follow the model.")
    return requested or carried or processor_setting or "softmax"


def _sigmoid_top_k(logits, boxes_xyxy, threshold: float, top_k: int) -> list[dict]:
    """Deformable DETR's post-processing: top-k over queries x classes of per-class sigmoid scores."""
    num_labels = logits.shape[-1]
    probs = logits.sigmoid().flatten(1)                                          # [batch, queries * num_labels]
    scores, flat_index = probs.topk(min(top_k, probs.shape[1]), dim=1)           # [batch, k], best first
    queries = torch.div(flat_index, num_labels, rounding_mode="floor")           # [batch, k]
    labels = flat_index % num_labels
    boxes_xyxy = boxes_xyxy.gather(1, queries[..., None].expand(-1, -1, 4))      # [batch, k, 4]
    keep = scores > threshold
    return [{"scores": s[k], "labels": c[k], "boxes": b[k]} for s, c, b, k in zip(scores, labels, boxes_xyxy, keep)]
