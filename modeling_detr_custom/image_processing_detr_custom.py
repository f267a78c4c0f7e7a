"""DetrCustomImageProcessor: images + COCO detection annotations -> pixel_values, pixel_mask, labels.

Conventions (DESIGN.md):
- ``pixel_mask`` is 1 on real pixels and 0 on padding (the HF polarity; DETR's NestedTensor mask is the reverse).
- label boxes are ``(center_x, center_y, width, height)`` normalized by the *visible* (resized, unpadded) image,
  as in the original DETR (facebookresearch/detr#286), not by the padded batch size as transformers does since
  transformers#28363. The sine position encoding normalizes over the unmasked region, so this is what the model sees.

Speed (benchmarks/bench_image_processing.py): each image becomes a uint8 channels-last tensor without a copy, is
resized as uint8 (torch's antialiased AVX2 kernel, the one transformers' torchvision backend also ends up in, so the
pixels match it), then cast, rescaled and normalized straight into its slot of the padded batch, which comes
pre-zeroed from huge pages (`_zeros`). Images run in parallel, one per thread (`_for_each_image`). Only torch is
used for the pixel work (no torchvision).
"""
import math
import mmap
import numbers
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

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
    """Output (height, width) for an input of (height, width) under a standardized `size` dict."""
    if "height" in size:  # exact size, aspect ratio not kept (as transformers' DETR does)
        return size["height"], size["width"]
    if "max_height" in size:  # largest size that fits, aspect ratio kept (may upscale)
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return max(1, int(height * scale)), max(1, int(width * scale))
    # shortest edge -> shortest_edge unless the longest edge would exceed longest_edge. The long side is computed
    # from the unrounded short side so it never exceeds longest_edge: matches transformers' get_size_with_aspect_ratio
    short, long_edge = size["shortest_edge"], size.get("longest_edge")
    raw_short = None
    if long_edge is not None and max(height, width) / min(height, width) * short > long_edge:
        raw_short = long_edge * min(height, width) / max(height, width)
        short = int(round(raw_short))
        if short == 0:  # so elongated that the short side rounds to 0 (transformers then fails): keep one pixel
            return (1, long_edge) if height < width else (long_edge, 1)
    if min(height, width) == short:
        return height, width
    base = raw_short if raw_short is not None else short
    if width < height:
        return max(1, int(base * height / width)), short
    return short, max(1, int(base * width / height))


def _composite_on_white(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[..., C] uint8 colour and [..., 1] uint8 alpha -> [..., C] uint8 over a white background, rounded."""
    rgb, alpha = rgb.float() / 255, alpha.float() / 255
    return ((rgb * alpha + (1 - alpha)) * 255).round_().to(torch.uint8)


def _pil_to_hwc(image: PIL.Image.Image) -> np.ndarray:
    """PIL image in any common mode -> [height, width, 3] uint8, EXIF orientation applied."""
    if image.getexif().get(0x0112, 1) != 1:  # 0x0112 = Orientation
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit grayscale (I;16*, or I as Pillow opens 16-bit PNGs): 0..65535 -> 0..255
        gray = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(gray * (255 / 65535)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if "A" in image.getbands() or image.info.get("transparency") is not None:  # LA, RGBA, PA, P with transparency
        # composited on white, as transformers' convert_to_rgb does
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))  # L, P, CMYK, YCbCr, 1, ...


def _to_rgb_tensor(image, index: int, input_data_format=None) -> torch.Tensor:
    """One user image -> [3, height, width] uint8 or float tensor (channels-last strides when from HWC data)."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image {index} has zero size (height {image.height}, width {image.width})")
        return torch.from_numpy(_pil_to_hwc(image)).permute(2, 0, 1)  # [3, height, width], channels-last strides
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "uif":
            raise ValueError(f"image {index} has dtype {image.dtype}; expected uint8 (0..255) or float (0..1)")
        if image.dtype.byteorder not in "=|" or not image.flags.writeable or image.dtype == np.float16:
            image = image.astype(image.dtype.newbyteorder("=") if image.dtype != np.float16 else np.float32)
        tensor, channels_first_default = torch.from_numpy(image), False  # numpy/PIL habit: HWC
    elif isinstance(image, torch.Tensor):
        tensor, channels_first_default = image.detach(), True  # torch habit: CHW
    else:
        raise ValueError(f"image {index} is a {type(image).__name__}, not a PIL image, numpy array or torch tensor")

    if tensor.ndim == 2:
        tensor = tensor[None]
        input_data_format = "channels_first"
    if tensor.ndim != 3:
        raise ValueError(f"image {index} must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}")
    if input_data_format is None:
        first, last = tensor.shape[0] in (1, 2, 3, 4), tensor.shape[-1] in (1, 2, 3, 4)
        if first != last:
            channels_first = first
        else:
            channels_first = channels_first_default
    elif input_data_format in ("channels_first", "channels_last"):
        channels_first = input_data_format == "channels_first"
    else:
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}")
    if not channels_first:
        tensor = tensor.permute(2, 0, 1)  # [channels, height, width] view with channels-last strides
    num_channels, height, width = tensor.shape
    if height == 0 or width == 0:
        raise ValueError(f"image {index} has zero size (height {height}, width {width})")
    if num_channels not in (1, 2, 3, 4):
        raise ValueError(f"image {index} has {num_channels} channels; expected 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA)")

    if tensor.is_floating_point():
        tensor = tensor.float()
        low, high = torch.aminmax(tensor)
        if not (low >= 0 and high <= 1):
            raise ValueError(
                f"image {index} is float with values in [{low.item()}, {high.item()}]; float images must be in "
                "[0, 1] (pass uint8 for 0..255 data)"
            )
    elif tensor.dtype != torch.uint8:
        raise ValueError(f"image {index} has dtype {tensor.dtype}; expected uint8 (0..255) or float (0..1)")

    if num_channels in (2, 4):  # gray/colour + alpha, composited on white as transformers does
        hwc = tensor.permute(1, 2, 0)
        if tensor.is_floating_point():
            rgb = hwc[..., :-1] * hwc[..., -1:] + (1 - hwc[..., -1:])
        else:
            rgb = _composite_on_white(hwc[..., :-1], hwc[..., -1:])
        tensor = rgb.permute(2, 0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, height, width)
    return tensor


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, but big CPU batches come from a fresh anonymous mapping advised for transparent huge pages.

    A 16-image batch is ~360 MB of new memory; faulting it in 4 KB pages costs more than all the pixel work. Huge pages
    (when the kernel has THP in "madvise" or "always" mode) cut that by ~4x, and the kernel hands the mapping out
    already zeroed, so the padding needs no extra write. Anywhere else this is plain torch.zeros.
    """
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < (8 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    try:
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)  # the tensor keeps the mapping alive


_IMAGE_THREADS = {"pid": None, "pool": None, "threads": 0, "lock": threading.Lock()}


def _single_threaded_torch():
    torch.get_num_threads()  # torch sets a new thread's thread count on first use: let it, then override it
    torch.set_num_threads(1)


def _for_each_image(function, num_images: int, device: torch.device):
    """function(i) for every image; on CPU, images run in parallel on threads that each run torch single-threaded.

    Splitting every op of every image across torch's threads costs a barrier per op, and when other processes hold
    the cores each barrier waits for a descheduled thread: the batch then takes several times longer. Whole images
    per thread need no barrier. The pool is per process (a fork, e.g. a DataLoader worker, builds its own); workers
    that run torch with one thread, as DataLoader workers do, just loop.
    """
    num_threads = torch.get_num_threads()
    if device.type != "cpu" or num_threads == 1 or num_images == 1:
        for i in range(num_images):
            function(i)
        return
    with _IMAGE_THREADS["lock"]:
        pool = _IMAGE_THREADS["pool"]
        if _IMAGE_THREADS["pid"] != os.getpid() or _IMAGE_THREADS["threads"] != num_threads:
            started = threading.Barrier(num_threads)
            pool = ThreadPoolExecutor(num_threads, thread_name_prefix="detr-image", initializer=_single_threaded_torch)
            list(pool.map(lambda _: started.wait(), range(num_threads)))  # every thread up and single-threaded
            torch.set_num_threads(num_threads)  # set_num_threads(1) also set the default for threads started later
            _IMAGE_THREADS.update(pid=os.getpid(), pool=pool, threads=num_threads)
    list(pool.map(lambda k: [function(i) for i in range(k, num_images, num_threads)], range(num_threads)))


def _native_uint8_resize(mode: str, device: torch.device) -> bool:
    # same rule as torchvision's resize, so our uint8 pixels equal transformers' torchvision backend bit for bit
    if device.type != "cpu":
        return mode.startswith("nearest")
    if mode == "bilinear":
        is_arm = platform.machine() in ("aarch64", "arm64")
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or is_arm
    return True


def _resize(image: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """[3, H, W] uint8/float -> [1, 3, height, width], same dtype, antialiased like torchvision's resize."""
    batch = image[None]                                                       # [1, 3, H, W]
    if batch.is_contiguous(memory_format=torch.channels_last):
        # interpolate allocates a contiguous output for a [1, C, H, W] channels-last input unless the batch stride
        # is unambiguous (pytorch#68430); the channels-last output skips a repacking copy in the uint8 kernel
        batch = batch.as_strided(batch.shape, (batch.numel(),) + batch.stride()[1:])
    else:
        batch = batch.contiguous(memory_format=torch.channels_last)
    is_uint8 = batch.dtype == torch.uint8
    if is_uint8 and not _native_uint8_resize(mode, batch.device):
        batch = batch.float()
    smooth = mode in ("bilinear", "bicubic")
    out = F.interpolate(batch, size=(height, width), mode=mode, align_corners=False if smooth else None,
                        antialias=smooth)
    if is_uint8 and out.dtype != torch.uint8:
        out = out.clamp_(0, 255).round_().to(torch.uint8)
    return out


def _as_number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _parse_annotations(target, index: int, category_id_to_label) -> dict:
    """Validate one COCO detection dict -> python lists (no tensors yet); errors name image, annotation, field."""
    where = f"annotations[{index}]"
    if not isinstance(target, dict) or not isinstance(target.get("annotations"), (list, tuple)):
        raise ValueError(f'{where} must be a dict {{"image_id": int, "annotations": [...]}}, got {type(target)}')
    image_id = target.get("image_id", index)
    if isinstance(image_id, bool) or not isinstance(image_id, numbers.Integral):
        raise ValueError(f"{where}['image_id'] must be an int, got {image_id!r}")
    boxes, classes, areas, crowd = [], [], [], []
    for j, obj in enumerate(target["annotations"]):
        at = f"{where}['annotations'][{j}]"
        if not isinstance(obj, dict):
            raise ValueError(f"{at} must be a dict with 'bbox' and 'category_id', got {type(obj).__name__}")
        bbox = obj.get("bbox")
        if isinstance(bbox, (np.ndarray, torch.Tensor)):
            bbox = bbox.tolist()
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{at}['bbox'] must be 4 finite numbers [x, y, width, height], got {bbox!r}")
        bbox = [_as_number(v, f"{at}['bbox'] value") for v in bbox]
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{at}['bbox'] has a negative width or height: {bbox} (COCO is [x, y, width, height])")
        category_id = obj.get("category_id")
        if isinstance(category_id, (np.integer, torch.Tensor)):
            category_id = int(category_id)
        if isinstance(category_id, bool) or not isinstance(category_id, numbers.Integral):
            raise ValueError(f"{at}['category_id'] must be an int, got {category_id!r}")
        if category_id_to_label is not None:
            if category_id not in category_id_to_label:
                raise ValueError(f"{at}['category_id'] {category_id} is not in category_id_to_label "
                                 f"(known ids: {sorted(category_id_to_label)[:20]})")
            category_id = category_id_to_label[category_id]
        boxes.append(bbox)
        classes.append(category_id)
        areas.append(_as_number(obj["area"], f"{at}['area']") if "area" in obj else bbox[2] * bbox[3])
        crowd.append(1 if obj.get("iscrowd", 0) else 0)
    return {"image_id": int(image_id), "boxes": boxes, "classes": classes, "areas": areas, "iscrowd": crowd}


def _make_labels(parsed: dict, orig_hw, new_hw, drop_crowd: bool, normalize_boxes: bool) -> dict:
    """Parsed annotations of one image -> DETR labels for the resized (visible, unpadded) image."""
    orig_h, orig_w = orig_hw
    new_h, new_w = new_hw
    boxes = torch.tensor(parsed["boxes"], dtype=torch.float32).reshape(-1, 4)   # [n, 4], xywh, original pixels
    boxes[:, 2:] += boxes[:, :2]                                                # -> xyxy
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=orig_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=orig_h)
    iscrowd = torch.tensor(parsed["iscrowd"], dtype=torch.int64)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = nonempty & (iscrowd == 0) if drop_crowd else nonempty
    boxes = boxes[keep]
    area = torch.tensor(parsed["areas"], dtype=torch.float32)[keep]
    if (new_h, new_w) != (orig_h, orig_w):
        ratio_h, ratio_w = new_h / orig_h, new_w / orig_w
        boxes = boxes * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
        area = area * (ratio_w * ratio_h)
    if normalize_boxes:
        # normalized by the visible image, not the padded batch (DESIGN.md, facebookresearch/detr#286)
        boxes = box_xyxy_to_cxcywh(boxes) / torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float32)
    return {
        "image_id": torch.tensor([parsed["image_id"]], dtype=torch.int64),
        "class_labels": torch.tensor(parsed["classes"], dtype=torch.int64)[keep],   # [n]
        "boxes": boxes,                                                               # [n, 4]
        "area": area,                                                                 # [n]
        "iscrowd": iscrowd[keep],                                                     # [n]
        "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
        "size": torch.tensor([new_h, new_w], dtype=torch.int64),
        "num_dropped_boxes": (~nonempty).sum(),                                       # [], zero-size after clipping
    }


class DetrCustomImageProcessor(BaseImageProcessor):
    r"""Image processor for DETR: resize, rescale, normalize, pad, pixel mask, COCO labels, post-processing.

    ``processor(images, annotations=None, return_tensors="pt")`` returns a ``BatchFeature`` with

    - ``pixel_values`` ``[batch, 3, height, width]`` float32, padded bottom/right to the largest image (or to
      ``pad_size``);
    - ``pixel_mask`` ``[batch, height, width]`` int64, **1 on real pixels, 0 on padding**;
    - ``labels`` (when annotations are given): one dict per image with ``class_labels`` int64 ``[n]``, ``boxes``
      float32 ``[n, 4]`` as ``(center_x, center_y, width, height)`` **normalized by the visible resized image, not the
      padded one**, ``area`` (rescaled to the resized image), ``iscrowd``, ``orig_size`` and ``size`` (height, width
      before and after resizing, unpadded), ``image_id`` ``[1]``, and ``num_dropped_boxes`` (0-d int64): how many
      boxes had zero width or height after clipping to the image and were dropped.

    Images: PIL images (any common mode: L, LA, P, RGBA, CMYK, I;16 ... become RGB, alpha composited on white, EXIF
    orientation applied), numpy arrays or torch tensors, HWC or CHW (2-D = grayscale), uint8 in 0..255 or float in
    [0, 1]. Float images are taken as already rescaled: ``rescale_factor`` only applies to uint8 data. When a 3-D
    array's layout is ambiguous (both first and last dims could be channels) numpy arrays are read as HWC and torch
    tensors as CHW; pass ``input_data_format`` to say otherwise.

    Annotations: COCO detection dicts ``{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int,
    "area": float, "iscrowd": 0 or 1}]}``. Boxes are clipped to the image; boxes with zero width or height after
    clipping are dropped (and counted); crowd boxes are kept with ``iscrowd`` = 1 unless ``drop_crowd=True``.
    ``category_id_to_label`` maps dataset category ids to contiguous class labels.

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
        drop_crowd: bool = False,
        category_id_to_label: dict | None = None,
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
        self._check_settings(self.resample, self.pad_size, self.image_mean, self.image_std)

    @staticmethod
    def _check_settings(resample, pad_size, image_mean, image_std):
        if resample not in _RESAMPLE_TO_MODE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE_TO_MODE)} (PIL NEAREST, BILINEAR, BICUBIC), "
                             f"got {resample}")
        if pad_size is not None and set(pad_size) != {"height", "width"}:
            raise ValueError(f'pad_size must be {{"height": int, "width": int}}, got {pad_size}')
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean and image_std need 3 values (std > 0), got {image_mean} and {image_std}")

    def preprocess(
        self,
        images,
        annotations=None,
        return_tensors="pt",
        do_resize: bool | None = None,
        size=None,
        resample: int | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean=None,
        image_std=None,
        do_pad: bool | None = None,
        pad_size=None,
        do_convert_annotations: bool | None = None,
        drop_crowd: bool | None = None,
        category_id_to_label: dict | None = None,
        input_data_format: str | None = None,
    ) -> BatchFeature:
        """Process one image or a list of images (and their COCO annotations); see the class docstring."""
        def pick(value, default):
            return default if value is None else value

        do_resize, do_rescale = pick(do_resize, self.do_resize), pick(do_rescale, self.do_rescale)
        do_normalize, do_pad = pick(do_normalize, self.do_normalize), pick(do_pad, self.do_pad)
        size = self.size if size is None else _standardize_size(size, max_size=self.size.get("longest_edge"))
        resample, rescale_factor = int(pick(resample, self.resample)), pick(rescale_factor, self.rescale_factor)
        image_mean, image_std = pick(image_mean, self.image_mean), pick(image_std, self.image_std)
        pad_size = pick(pad_size, self.pad_size)
        do_convert_annotations = pick(do_convert_annotations, self.do_convert_annotations)
        drop_crowd = pick(drop_crowd, self.drop_crowd)
        category_id_to_label = pick(category_id_to_label, self.category_id_to_label)
        self._check_settings(resample, pad_size, image_mean, image_std)
        if return_tensors not in (None, "pt") and str(getattr(return_tensors, "value", return_tensors)) != "pt":
            raise ValueError(f"return_tensors must be 'pt' or None (torch tensors either way), got {return_tensors!r}")

        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("images is empty: pass at least one image")
        if annotations is not None:
            if isinstance(annotations, dict):
                annotations = [annotations]
            if len(annotations) != len(images):
                raise ValueError(f"got {len(annotations)} annotation dicts for {len(images)} images; "
                                 "pass exactly one per image")
            # validate every annotation before touching pixels: bad data fails fast
            parsed = [_parse_annotations(target, i, category_id_to_label) for i, target in enumerate(annotations)]

        tensors = [_to_rgb_tensor(image, i, input_data_format) for i, image in enumerate(images)]
        orig_sizes = [tuple(t.shape[-2:]) for t in tensors]
        new_sizes = [get_resize_output_size(h, w, size) if do_resize else (h, w) for h, w in orig_sizes]

        if do_pad:
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

        # rescale and normalize fused: x * scale + bias, per channel
        mean = torch.tensor(image_mean, dtype=torch.float32) if do_normalize else torch.zeros(3)
        std = torch.tensor(image_std, dtype=torch.float32) if do_normalize else torch.ones(3)
        device = tensors[0].device
        pixel_values = _zeros((len(tensors), 3, pad_h, pad_w), torch.float32, device)  # padding stays 0
        pixel_mask = _zeros((len(tensors), pad_h, pad_w), torch.int64, device) if do_pad else None
        mode = _RESAMPLE_TO_MODE[resample]

        def write_image(i: int):
            (h, w), image = new_sizes[i], tensors[i].to(device)
            if (h, w) != tuple(image.shape[-2:]):
                image = _resize(image, h, w, mode)[0]                            # [3, h, w]
            factor = rescale_factor if do_rescale and image.dtype == torch.uint8 else 1.0
            scale = (factor / std).to(device)[:, None, None]                    # [3, 1, 1]
            bias = (-mean / std).to(device)[:, None, None]
            # one cast-and-transpose copy, then two in-place passes: faster than a mixed-dtype addcmul
            region = pixel_values[i, :, :h, :w].copy_(image)
            if factor != 1.0 or do_normalize:
                region.mul_(scale).add_(bias)
            if pixel_mask is not None:
                pixel_mask[i, :h, :w] = 1

        _for_each_image(write_image, len(tensors), device)

        data = {"pixel_values": pixel_values}
        if pixel_mask is not None:
            data["pixel_mask"] = pixel_mask
        batch = BatchFeature(data=data)
        if annotations is not None:
            batch["labels"] = [
                _make_labels(p, orig, new, drop_crowd, do_convert_annotations)
                for p, orig, new in zip(parsed, orig_sizes, new_sizes)
            ]
        return batch

    def post_process_object_detection(self, outputs, threshold: float = 0.5, target_sizes=None, top_k=None):
        """Raw outputs -> one dict per image: ``scores`` [k], ``labels`` [k], ``boxes`` [k, 4] absolute x0, y0, x1, y1.

        ``outputs`` has ``logits`` [batch, queries, num_labels + 1] (last = no object) and ``pred_boxes``
        [batch, queries, 4] (cx, cy, w, h in [0, 1] of the visible image). Boxes are scaled to each image's
        ``target_sizes`` (height, width) - a [batch, 2] tensor or a list of pairs - and clipped to it (to [0, 1] when
        no target size is given). Detections with score > ``threshold`` are kept in query order; with ``top_k``, the
        ``top_k`` best of them, best first.
        """
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        pred_boxes = outputs["pred_boxes"] if isinstance(outputs, dict) else outputs.pred_boxes
        probs = logits.softmax(-1)[..., :-1]                                     # [batch, queries, num_labels]
        scores, labels = probs.max(-1)                                           # [batch, queries]
        boxes_xyxy = box_cxcywh_to_xyxy(pred_boxes)                              # [batch, queries, 4], in [0, 1]
        if target_sizes is not None:
            sizes = torch.as_tensor(target_sizes if not isinstance(target_sizes, list)
                                    else [list(s) for s in target_sizes]).to(boxes_xyxy)
            if sizes.ndim != 2 or sizes.shape != (len(logits), 2):
                raise ValueError(f"target_sizes must hold one (height, width) per image: {len(logits)} pairs, got "
                                 f"shape {tuple(sizes.shape)}")
            height, width = sizes.unbind(1)                                      # [batch]
        else:
            height = width = torch.ones(len(logits), dtype=boxes_xyxy.dtype, device=boxes_xyxy.device)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]   # [batch, 1, 4]
        boxes_xyxy = torch.minimum((boxes_xyxy * scale).clamp(min=0), scale)
        results = []
        for image_scores, image_labels, image_boxes in zip(scores, labels, boxes_xyxy):
            keep = image_scores > threshold
            image_scores, image_labels, image_boxes = image_scores[keep], image_labels[keep], image_boxes[keep]
            if top_k is not None:
                order = image_scores.argsort(descending=True)[:top_k]
                image_scores, image_labels, image_boxes = image_scores[order], image_labels[order], image_boxes[order]
            results.append({"scores": image_scores, "labels": image_labels, "boxes": image_boxes})
        return results
