"""Image kernels of DetrCustomImageProcessor: user images -> RGB tensors -> one normalized, padded batch.

Speed (benchmarks/bench_image_processing.py): each image becomes a uint8 channels-last tensor without a copy, is
resized as uint8 (torch's antialiased AVX2 kernel, the one transformers' torchvision backend also ends up in, so the
pixels match it), then cast, rescaled and normalized straight into its slot of the padded batch, which comes
pre-zeroed from huge pages (`_zeros`). Images run in parallel, one per thread (`_for_each_image`). Only torch is
used for the pixel work (no torchvision).
"""
import math
import mmap
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F


def _composite_on_white(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[..., C] uint8 colour and [..., 1] uint8 alpha -> [..., C] uint8 over a white background, rounded."""
    rgb, alpha = rgb.float() / 255, alpha.float() / 255
    return ((rgb * alpha + (1 - alpha)) * 255).round_().to(torch.uint8)


# PIL modes with a defined conversion to RGB here; others (HSV, LAB, La, ...) are refused rather than guessed
SUPPORTED_PIL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16L",
                       "I;16B", "I;16N", "F")


def pil_to_rgb_array(image: PIL.Image.Image, exif_transpose: bool = True, where: str = "image") -> np.ndarray:
    """PIL image in a supported mode -> [height, width, 3] uint8: what the processor feeds the model for it.

    16-bit grayscale (I;16*, or I as Pillow opens 16-bit PNGs) is scaled 0..65535 -> 0..255 (PIL's own
    ``convert("RGB")`` saturates it to white); alpha (LA, RGBA, PA, P or RGB with transparency) is composited on
    white, as transformers' convert_to_rgb does; other modes go through PIL's ``convert("RGB")`` (F as PIL reads it,
    0..255). ``exif_transpose`` applies the EXIF orientation (the training data path applies it too: boxes are
    drawn on the upright view). The training collate calls this too, so both paths give the same pixels.
    """
    if image.mode not in SUPPORTED_PIL_MODES:
        raise ValueError(f"{where} has PIL mode {image.mode!r}, which has no defined conversion to RGB here; "
                         f"convert it first (supported: {', '.join(SUPPORTED_PIL_MODES)})")
    if exif_transpose and image.getexif().get(0x0112, 1) != 1:  # 0x0112 = Orientation
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit grayscale: 0..65535 -> 0..255
        gray = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(gray * (255 / 65535)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if "A" in image.getbands() or image.info.get("transparency") is not None:  # LA, RGBA, PA, P with transparency
        # composited on white, as transformers' convert_to_rgb does
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))  # L, P, CMYK, YCbCr, 1, F, ...


def to_rgb_tensor(image, index: int, input_data_format=None) -> torch.Tensor:
    """One user image -> [3, height, width] uint8 or float tensor (channels-last strides when from HWC data)."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image {index} has zero size (height {image.height}, width {image.width})")
        rgb = pil_to_rgb_array(image, where=f"image {index}")                       # [height, width, 3] uint8
        return torch.from_numpy(rgb).permute(2, 0, 1)  # [3, height, width], channels-last strides
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


def to_padded_batch(images: list, sizes: list, pad_hw: tuple, mode: str, rescale_factor: float, image_mean,
                    image_std, with_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[3, H, W] images (from `to_rgb_tensor`) -> pixel_values [batch, 3, pad_h, pad_w] float32, pixel_mask or None.

    Image i is resized to ``sizes[i]`` (height, width) with interpolate ``mode`` and written top-left, zero padding
    after it; ``pixel_mask`` (int64 [batch, pad_h, pad_w], with ``with_mask``) is 1 on those pixels. uint8 images are
    multiplied by ``rescale_factor`` (float images are taken as already rescaled); ``image_mean`` / ``image_std``
    normalize, or are None for no normalization. Everything lands on the first image's device.
    """
    do_normalize = image_mean is not None
    # rescale and normalize fused: x * scale + bias, per channel
    mean = torch.tensor(image_mean, dtype=torch.float32) if do_normalize else torch.zeros(3)
    std = torch.tensor(image_std, dtype=torch.float32) if do_normalize else torch.ones(3)
    device = images[0].device
    pad_h, pad_w = pad_hw
    pixel_values = _zeros((len(images), 3, pad_h, pad_w), torch.float32, device)  # padding stays 0
    pixel_mask = _zeros((len(images), pad_h, pad_w), torch.int64, device) if with_mask else None

    def write_image(i: int):
        (h, w), image = sizes[i], images[i].to(device)
        if (h, w) != tuple(image.shape[-2:]):
            image = _resize(image, h, w, mode)[0]                            # [3, h, w]
        factor = rescale_factor if image.dtype == torch.uint8 else 1.0
        scale = (factor / std).to(device)[:, None, None]                    # [3, 1, 1]
        bias = (-mean / std).to(device)[:, None, None]
        # one cast-and-transpose copy, then two in-place passes: faster than a mixed-dtype addcmul
        region = pixel_values[i, :, :h, :w].copy_(image)
        if factor != 1.0 or do_normalize:
            region.mul_(scale).add_(bias)
        if pixel_mask is not None:
            pixel_mask[i, :h, :w] = 1

    _for_each_image(write_image, len(images), device)
    return pixel_values, pixel_mask
