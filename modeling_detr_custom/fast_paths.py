"""The CPU speed-ups as one pass over a built model: frozen BatchNorm folded into the convolution before it (the
backbone, traced with torch.fx, each conv + BatchNorm + ReLU then one oneDNN convolution with post-ops at inference),
channels_last convolutions, the trained convolutions' layout chosen for this CPU's backward kernels, eval-mode
BatchNorm folded into its convolution (RT-DETR's hybrid encoder and BatchNorm projections) and RepVGG's two branches
merged into one 3x3 convolution at inference, with the folded weights cached while their sources are unchanged.
The outputs are those of the plain model (fp32 rounding).

The model files are plain PyTorch. `apply_fast_paths(model)` converts a built model in place: each module with a
speed-up gets its fast class (`FAST_CLASSES`, a subclass with the same parameters, buffers and state_dict keys),
whose forward picks the fast or the plain path per call by the measured rules below (the fold and channels_last
from `FAST_PATH_MIN_PIXELS` pixels per image with autograd, from any size at inference with frozen BatchNorm; the
folds at inference only). `DetrCustomPreTrainedModel.post_init` applies it to every model it builds, so a model as
built or loaded runs fast; `remove_fast_paths(model)` gives the plain classes back. While the forward is traced
(torch.export, the ONNX exporter) every fast class runs its plain forward, so exported graphs hold standard operators
only.

`cpu_bf16_support` tells callers (the training script, benchmarks) whether bf16 autocast can pay off on this CPU,
`cpu_backward_layout` which layout trained convolutions run in. tests/test_fast_paths.py checks each against the
plain path; benchmarks/bench_model.py times them.
"""
import functools
import operator
import os
import platform
import weakref

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers.norm_act import FrozenBatchNorm2d  # torchvision's class, as timm's freeze_batch_norm_2d makes it
from timm.layers.norm_act import FrozenBatchNormAct2d  # timm's BatchNormAct2d frozen (EfficientNet, MobileNet)
from torch import nn
from transformers.utils import logging

from .backbone import DetrCustomBackbone
from .blocks import tracing
from .encoder_hybrid import ConvNormLayer, RepVggBlock
from .multiscale import ConvNormProjection, DetrCustomMultiScaleBackbone

logger = logging.get_logger(__name__)

# fold and channels_last from this many pixels per image with autograd (training): below, the per-call pass over the
# weights and the layout changes cost more than they save (2 x 160 x 128, resnet18: 92 ms plain, 177 ms folded; R50
# forward + backward at 2 x 192 x 256: 288 ms plain, 334 ms fast)
FAST_PATH_MIN_PIXELS = 2 ** 17
# the same at inference with frozen BatchNorm (the folded weights are cached): from any size. Measured at batch 2,
# plain / fast, AVX-512 and AVX2 kernels (family 6 model 207 Xeon): resnet18 at 128 x 160 31 / 26 and 47 / 39 ms,
# at 384 x 512 183 / 107 and 310 / 243 ms; R50 at 128 x 160 66 / 48 ms; MobileNetV2 (channels_last only, its
# BatchNorm-act layers do not fold) at 128 x 128 33 / 22 ms. Trainable BatchNorm keeps the threshold above:
# channels_last alone made resnet18 slower at 128 x 128 (21 / 37 ms)
INFERENCE_FAST_PATH_MIN_PIXELS = 0


class _FrozenBatchNormTracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (FrozenBatchNorm2d, FrozenBatchNormAct2d))
                or super().is_leaf_module(module, qualified_name))


class ConvFrozenBatchNorm2d(nn.Module):
    """`norm(conv(x))` as one convolution: a frozen BatchNorm is x * scale + shift per channel, with
    scale = weight / sqrt(running_var + eps), so it folds into the convolution's weight (x scale) and bias.
    The fold is recomputed from the live tensors at every call (a pass over the weights, not over the much larger
    activations), so gradients reach `conv.weight` and no copy can go stale."""

    def __init__(self, conv: nn.Conv2d, norm: FrozenBatchNorm2d):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _folded_conv_forward(self, self.conv, self.norm, x)


def _folded_conv_forward(owner: nn.Module, conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(conv(x))` as one convolution with the folded weights (`folded_conv_batch_norm`), cached on `owner`.
    A convolution that will be differentiated runs in the layout of `cpu_backward_layout`."""
    if (x.device.type == "cpu" and torch.is_grad_enabled() and conv.weight.requires_grad and x.ndim == 4
            and cpu_backward_layout()[0] == "contiguous" and not x.is_contiguous()):
        x = _contiguous_copy(x)
    weight, bias = _folded_weights(owner, conv, norm, x)
    return conv._conv_forward(x, weight, bias)


def _folded_weights(owner: nn.Module, conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor):
    def fold():
        weight, bias = folded_conv_batch_norm(conv, norm)
        return _like_input(weight, x), bias

    return cached_fold(owner, (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var),
                       x, fold)


class ConvFrozenBatchNorm2dReLU(nn.Module):
    """`relu(folded(x))` or, with a shortcut, `relu(folded(x) + shortcut)` (a ResNet block's end), `folded` a
    `ConvFrozenBatchNorm2d`. At CPU inference one oneDNN convolution with the addition and the ReLU as post-ops
    (`torch.ops.mkldnn._convolution_pointwise`, what torch.compile's CPU backend emits): no separate passes over the
    activations, the same fp32 results (equal in our runs; tests allow 1e-6) and a random R50 backbone at 800 x 1066
    5 % faster with AVX-512 kernels, 3 % with AVX2 ones. With autograd, on other devices or without oneDNN: the
    unfused modules, in place as the block did."""

    def __init__(self, folded: ConvFrozenBatchNorm2d, act: nn.ReLU):
        super().__init__()
        self.folded, self.act = folded, act

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if not _fusable(self.folded.conv, x):
            out = self.folded(x)
            return self.act(out if shortcut is None else out.add_(shortcut))
        conv = self.folded.conv
        weight, bias = _folded_weights(self.folded, conv, self.folded.norm, x)
        if torch.is_autocast_enabled("cpu"):        # as autocast runs conv2d: inputs, weight and bias in its dtype
            dtype = torch.get_autocast_dtype("cpu")
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
            shortcut = None if shortcut is None else shortcut.to(dtype)
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if shortcut is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, "relu", [], "")
        return torch.ops.mkldnn._convolution_pointwise(
            x, _like_input(shortcut, x), weight, bias, *geometry, "add", 1.0, "relu", [], "")


def _fusable(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    # while exporting: the plain convolution, so that the graph holds standard operators only
    return (not torch.is_grad_enabled() and not tracing() and x.device.type == "cpu" and x.ndim == 4
            and torch.backends.mkldnn.enabled and _pointwise_convolution_available()
            and isinstance(conv.padding, tuple)
            and conv.padding_mode == "zeros" and x.dtype in (torch.float32, torch.bfloat16))


@functools.cache
def _pointwise_convolution_available() -> bool:
    # measured on x86 only (oneDNN's x86 kernels); elsewhere the separate ops run
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def cached_fold(owner: nn.Module, sources: tuple, x: torch.Tensor, fold):
    """`fold()`, reused while no source tensor has changed: without autograd (inference) the folded weights of the
    last call are kept on `owner`, keyed by each source's storage and in-place version counter (`load_state_dict`,
    `.to()` and the foreach / for-loop optimizers change one) and by the input's memory format and dtype, and checked
    against a sample of each parameter's values: the fused optimizers (`torch.optim.AdamW(fused=True)`, the
    transformers Trainer's default) and writes through `.data` update parameters in place without bumping the version
    counter. Refolding the backbone's weights at every call cost ~25 ms per image (R18 and R50, 640 x 640). With
    autograd it always refolds, so that gradients reach the sources and no inference-mode tensor is saved for
    backward."""
    if torch.is_grad_enabled() or tracing():    # a captured graph folds from its parameters: no cache
        return fold()
    key = (tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in sources),
           x.is_contiguous(memory_format=torch.channels_last), x.dtype, x.device, torch.is_inference_mode_enabled())
    cache = owner.__dict__.get("_fold_cache")
    if cache is None or cache[0] != key or not all(
            torch.equal(sample, _value_sample(t)) for sample, t in zip(cache[2], _parameters(sources))):
        cache = (key, fold(), [_value_sample(t) for t in _parameters(sources)])
        owner.__dict__["_fold_cache"] = cache       # a plain attribute: never a buffer, never in the state_dict
    return cache[1]


def _parameters(sources: tuple) -> list[torch.Tensor]:
    return [t for t in sources if isinstance(t, nn.Parameter)]


def _value_sample(t: torch.Tensor) -> torch.Tensor:
    """~16 evenly spaced values of `t` (a copy): an optimizer step moves every one of them."""
    flat = t.detach().reshape(-1)
    return flat[::max(1, flat.numel() // 16)].clone()


def folded_conv_batch_norm(conv: nn.Conv2d, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one convolution equal to `norm(conv(x))`, `norm` a frozen BatchNorm or a BatchNorm in eval
    mode (running statistics): the backbone's, the hybrid encoder's and the RT-DETR projections'. Computed from the
    live tensors (callers cache it with `cached_fold`)."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()       # [out_channels]
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale[:, None, None, None], bias


def conv_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`norm(conv(x))`; in eval mode as one folded convolution (`folded_conv_batch_norm`): one pass over the
    activations instead of two. Training uses the batch statistics, unfolded."""
    if norm.training or not norm.track_running_stats:
        return norm(conv(x))
    return _folded_conv_forward(norm, conv, norm, x)


def _like_input(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # a weight (or a tensor to add) in the input's memory format: mixed formats take a much slower path under bf16
    # autocast
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4
    return weight.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def fold_frozen_batch_norm(body: nn.Module) -> torch.fx.GraphModule:
    """`body` (traced with torch.fx) with every frozen BatchNorm whose input is a plain `nn.Conv2d` used by nothing
    else replaced by a `ConvFrozenBatchNorm2d` of the two: the graph proves the BatchNorm follows the convolution.
    A ReLU after it (after the residual addition too) joins it as a `ConvFrozenBatchNorm2dReLU`. timm's
    `FrozenBatchNormAct2d` (EfficientNet-family blocks: MobileNetV2, EfficientNet) folds the same way, its dropout
    and activation (ReLU6, SiLU, ...) kept as the modules after the folded convolution.
    Shares `body`'s modules, parameters and buffers; the state_dict keys stay those of `body`."""
    graph = _FrozenBatchNormTracer().trace(body)
    modules = dict(body.named_modules())
    for node in graph.nodes:    # constants tracing stored on `body` (e.g. timm's feature hooks' tensors)
        if node.op == "get_attr" and node.target not in modules:
            modules[node.target] = operator.attrgetter(node.target)(body)
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target],
                                                      (FrozenBatchNorm2d, FrozenBatchNormAct2d)):
            continue
        conv_node = node.args[0]
        if not (isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module" and len(conv_node.users) == 1
                and type(modules[conv_node.target]) is nn.Conv2d):       # subclasses (e.g. StdConv2d) may rescale
            continue
        folded_name = f"{conv_node.target}_with_bn".replace(".", "_")
        modules[folded_name] = ConvFrozenBatchNorm2d(modules[conv_node.target], modules[node.target])
        conv_node.target = folded_name
        out = conv_node
        if isinstance(modules[node.target], FrozenBatchNormAct2d):     # then its dropout and activation
            with graph.inserting_before(node):
                for part in ("drop", "act"):
                    if type(modules[f"{node.target}.{part}"]) is not nn.Identity:
                        out = graph.call_module(f"{node.target}.{part}", (out,))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    for node in graph.nodes:
        # tracing turned the blocks' `x += shortcut` into `x + shortcut`: add in place again into a fresh conv output
        first = node.args[0] if node.op == "call_function" and node.target is operator.add else None
        if (isinstance(first, torch.fx.Node) and first.op == "call_module" and len(first.users) == 1
                and type(modules[first.target]) in (nn.Conv2d, ConvFrozenBatchNorm2d)):
            node.op, node.target = "call_method", "add_"
    _fuse_relu(graph, modules)
    return torch.fx.GraphModule(modules, graph, class_name=f"Folded{type(body).__name__}")


def _fuse_relu(graph: torch.fx.Graph, modules: dict) -> None:
    """Each `relu(folded conv)` and `relu(folded conv + shortcut)` of the graph as one `ConvFrozenBatchNorm2dReLU`
    (nn.Identity nodes between them, such as timm's unused drop_block and anti-aliasing slots, dropped first)."""
    def single_use_folded(node):
        return (isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.users) == 1
                and type(modules[node.target]) is ConvFrozenBatchNorm2d)

    for node in list(graph.nodes):
        if node.op == "call_module" and type(modules[node.target]) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in list(graph.nodes):
        if not (node.op == "call_module" and type(modules[node.target]) is nn.ReLU):
            continue
        source = node.args[0]
        if single_use_folded(source):
            conv_node, inputs, erased = source, source.args, []
        elif (isinstance(source, torch.fx.Node) and source.op == "call_method" and source.target == "add_"
                and len(source.users) == 1 and single_use_folded(source.args[0])):
            conv_node, inputs, erased = source.args[0], (source.args[0].args[0], source.args[1]), [source]
        else:
            continue
        fused_name = f"{conv_node.target}_{node.target}".replace(".", "_")
        modules[fused_name] = ConvFrozenBatchNorm2dReLU(modules[conv_node.target], modules[node.target])
        with graph.inserting_before(node):
            fused = graph.call_module(fused_name, inputs)
        node.replace_all_uses_with(fused)
        for dead in [node, *erased, conv_node]:
            graph.erase_node(dead)


_last_copy = (None, None, None)        # (weakref to a channels_last input, its version, weakref to its NCHW copy)


def _contiguous_copy(x: torch.Tensor) -> torch.Tensor:
    """`x.contiguous()`, shared by the convolutions that read the same input (a ResNet stage's first block feeds its
    first convolution and its downsample from one map). Weak references: the copy lives as long as autograd keeps it
    for the backward pass, not longer."""
    global _last_copy
    source, version, copy = _last_copy
    if source is not None and source() is x and version == x._version and copy() is not None:
        return copy()
    result = x.contiguous()
    _last_copy = (weakref.ref(x), x._version, weakref.ref(result))
    return result


@functools.cache
def _detected_backward_layout() -> tuple[str, str]:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "channels_last", f"torch's CPU capability is {capability}: oneDNN's NHWC backward is the faster one"
    return "contiguous", (f"torch's CPU capability is {capability}, no AVX-512: oneDNN's NHWC convolution backward is "
                          "slower than NCHW there")


def cpu_backward_layout() -> tuple[str, str]:
    """(layout, why): the memory format the backbone's trained convolutions run in on this CPU, "channels_last" or
    "contiguous" (NCHW). The frozen stem and first stage, and every convolution at inference, run channels_last.

    Measured with the R50 backbone at 2 x 800 x 1066, forward + backward of layer2-4 per convolution (torch
    profiler): with AVX-512 kernels NHWC is faster for every convolution (5.2 s vs 7.5 s for the whole backbone on
    an Intel Xeon family 6 model 207); with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, same
    machine) the NHWC backward of the 3x3 and strided convolutions runs 1.3-2x slower than NCHW (convolution
    backward 6.6 s vs 5.2 s in a training step). Set `DETR_CUSTOM_CPU_BACKWARD_LAYOUT=channels_last|contiguous` to
    override the detection (tests use it)."""
    forced = os.environ.get("DETR_CUSTOM_CPU_BACKWARD_LAYOUT")
    if forced in ("channels_last", "contiguous"):
        return forced, f"DETR_CUSTOM_CPU_BACKWARD_LAYOUT={forced}"
    return _detected_backward_layout()


def cpu_bf16_support() -> tuple[bool, str]:
    """(native, why): whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX), with a sentence saying which.

    Without either, oneDNN emulates bf16 with fp32 instructions plus conversions: on an AVX2-only AMD EPYC (Zen 1)
    bf16 autocast ran DETR 4.6x slower than fp32, so callers run fp32 there instead of autocasting. Set
    `DETR_CUSTOM_CPU_BF16=native|emulated` to override the detection (tests use it)."""
    forced = os.environ.get("DETR_CUSTOM_CPU_BF16")
    if forced in ("native", "emulated"):
        return forced == "native", f"DETR_CUSTOM_CPU_BF16={forced}"
    if torch.cpu._is_amx_tile_supported():
        return True, "the CPU has AMX tiles (native bf16 matrix units)"
    if torch.cpu._is_avx512_bf16_supported():
        return True, "the CPU has AVX512_BF16 (native bf16 dot products)"
    capability = torch.backends.cpu.get_cpu_capability()
    return False, (f"the CPU has neither AVX512_BF16 nor AMX (torch's capability: {capability}), so bf16 is emulated "
                   "with fp32 instructions and runs several times slower than fp32")


class _FastPaths:
    """Mixin of the fast classes: `plain_class` is the architecture class it speeds up. `train()` (which every
    training loop calls before its steps) drops the module's fold caches: whatever the optimizer does to the
    parameters, the next inference folds them afresh (`cached_fold`'s checks cover writes made outside training)."""

    plain_class: type

    def train(self, mode: bool = True):
        self.__dict__.pop("_fold_cache", None)
        folded = self.__dict__.get("_folded")                 # a backbone's folded body: not a submodule
        if folded is not None:
            for module in folded[1].modules():
                module.__dict__.pop("_fold_cache", None)
        return super().train(mode)


class _FastBackbone(_FastPaths):
    """The backbone's body through the folded BatchNorm and channels_last on large enough images
    (`FAST_PATH_MIN_PIXELS`; at inference with frozen BatchNorm from any size)."""

    def _init_fast_paths(self):
        # frozen BatchNorm is folded into the convolutions when the body runs, see `folded_body`
        self.fold_batch_norm = any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d))
                                   for m in self.body.modules())
        self.fast_path_min_pixels = FAST_PATH_MIN_PIXELS   # per image; tests set 0 to run the fast paths small
        # without autograd and with frozen BatchNorm (the fold cached): from any size
        self.inference_fast_path_min_pixels = INFERENCE_FAST_PATH_MIN_PIXELS
        self._folded = None

    def folded_body(self) -> nn.Module:
        """`self.body` with each frozen BatchNorm folded into the convolution before it (`fold_frozen_batch_norm`):
        the same parameters and buffers, fewer passes over the activations. Built once, never in the state_dict."""
        if self._folded is None or self._folded[0] is not self.body:
            try:
                folded = fold_frozen_batch_norm(self.body)
            except Exception as error:  # noqa: BLE001 - a timm model that torch.fx cannot trace runs unfolded
                logger.warning_once(f"cannot fold the BatchNorm of backbone {type(self.body).__name__}: {error}")
                folded = self.body
            self._folded = (self.body, folded)                         # a tuple: not registered as a submodule
        return self._folded[1]

    def run_body(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if tracing():            # an exported graph holds the plain body (its runtime does its own fusions)
            return super().run_body(pixel_values)
        body = self.body
        inference = self.fold_batch_norm and not torch.is_grad_enabled()
        threshold = self.inference_fast_path_min_pixels if inference else self.fast_path_min_pixels
        if pixel_values.shape[-2] * pixel_values.shape[-1] >= threshold:
            body = self.folded_body() if self.fold_batch_norm else self.body
            # channels_last: oneDNN's convolutions are ~1.4x faster in NHWC on CPU; trained ones may switch back to
            # NCHW where its backward is faster (`cpu_backward_layout`)
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return body(pixel_values)


class FastBackbone(_FastBackbone, DetrCustomBackbone):
    plain_class = DetrCustomBackbone


class FastMultiScaleBackbone(_FastBackbone, DetrCustomMultiScaleBackbone):
    plain_class = DetrCustomMultiScaleBackbone


class FoldedConvNormLayer(_FastPaths, ConvNormLayer):
    """conv + BatchNorm (+ activation) of the hybrid encoder; in eval mode one folded convolution."""

    plain_class = ConvNormLayer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            return super().forward(x)
        return self.activation(conv_batch_norm(self.conv, self.norm, x))


class FoldedProjection(_FastPaths, ConvNormProjection):
    """A level projection; with BatchNorm in eval mode one folded convolution."""

    plain_class = ConvNormProjection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm = self
        if tracing() or not isinstance(norm, nn.BatchNorm2d):
            return super().forward(x)
        return conv_batch_norm(conv, norm, x)


class MergedRepVggBlock(_FastPaths, RepVggBlock):
    """RepVGG's re-parameterization at inference: both branches as one 3x3 convolution (the 1x1 kernel at its
    centre), folded from the live weights and cached while they are unchanged (`cached_fold`)."""

    plain_class = RepVggBlock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or tracing():
            return super().forward(x)

        def fold():
            weight3, bias3 = folded_conv_batch_norm(self.conv1.conv, self.conv1.norm)
            weight1, bias1 = folded_conv_batch_norm(self.conv2.conv, self.conv2.norm)
            return _like_input(weight3 + F.pad(weight1, [1, 1, 1, 1]), x), bias3 + bias1

        sources = tuple(t for layer in (self.conv1, self.conv2) for t in (
            layer.conv.weight, layer.norm.weight, layer.norm.bias, layer.norm.running_mean, layer.norm.running_var))
        weight, bias = cached_fold(self, sources, x, fold)
        return self.activation(self.conv1.conv._conv_forward(x, weight, bias))


# architecture class -> its fast class (exact types: a subclass of ours may compute something else)
FAST_CLASSES = {fast.plain_class: fast for fast in (FastBackbone, FastMultiScaleBackbone, FoldedConvNormLayer,
                                                    FoldedProjection, MergedRepVggBlock)}


def apply_fast_paths(model: nn.Module) -> nn.Module:
    """Converts `model` in place to its fast form and returns it: every module with a speed-up gets its fast class
    (`FAST_CLASSES`): the same parameters, buffers and state_dict keys, the plain model's outputs. Idempotent.
    Applied to every model `DetrCustomPreTrainedModel` builds; call it on a model after `remove_fast_paths`."""
    for module in model.modules():
        fast = FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
            if isinstance(module, _FastBackbone):
                module._init_fast_paths()
    return model


def remove_fast_paths(model: nn.Module) -> nn.Module:
    """The inverse of `apply_fast_paths`: every module back to its architecture class (and its fold caches dropped),
    in place; returns `model`."""
    for module in model.modules():
        if isinstance(module, _FastPaths):
            for name in ("fold_batch_norm", "fast_path_min_pixels", "inference_fast_path_min_pixels", "_folded",
                         "_fold_cache"):
                module.__dict__.pop(name, None)
            module.__class__ = module.plain_class
        module.__dict__.pop("_fold_cache", None)
    return model
