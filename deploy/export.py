"""detr-custom-export: a detector folder -> an ONNX file (ONNX Runtime) or an OpenVINO IR (.xml + .bin), checked
against PyTorch before it is reported written.

    detr-custom-export outputs/demo/best --format onnx --output demo.onnx
    detr-custom-export MODEL --format openvino --output demo.xml [--opset 18] [--batch_size 1] [--winograd]
    detr-custom-export MODEL --format openvino --output demo_bf16.xml --precision bf16
    detr-custom-export MODEL --format openvino --output demo_int8.xml --precision int8 --calibration_data train2017/
    detr-custom-export MODEL --format openvino --output demo_int8.xml --precision int8 --calibration_data train2017/ \
        --int8_max_ap_drop 0.5 --data_dir data/demo

The file's inputs are `pixel_values` [batch, 3, height, width] float32 and `pixel_mask` [batch, height, width] int64
(1 on real pixels, 0 on padding), its outputs `logits` and `pred_boxes` (cx, cy, w, h in [0, 1] of each image's
unpadded region), the model's own: pre- and post-processing stay DetrCustomImageProcessor's, whose settings, the
class names and the class activation travel in the file's metadata (detr-custom-predict and detr-custom-eval read
them). Batch, height and width are dynamic in both formats (--batch_size fixes the batch); padded batches give each
image's outputs as PyTorch does. With --postprocess the graph also selects the top k (scores, labels, boxes in
pixels); a processor's duplicate removal (`nms_iou_threshold`) stays outside the graph, applied by our runtimes.

ONNX: torch.onnx.export's dynamo exporter (torch.export, standard operators only). OpenVINO: converted from that ONNX
file, weights kept in fp32, run in fp32 unless --precision says otherwise: bf16 (the same weights, bf16 arithmetic,
the runtime's default on CPUs with AVX512_BF16 or AMX) or int8 (NNCF post-training quantization, calibrated on
training images; --int8_scope transformer keeps the convolutions in fp32); the precision travels in the metadata and
exported.py compiles the file at it. int8 with --int8_max_ap_drop D and validation data (detr-custom-eval's
arguments): accuracy control (NNCF's quantize_with_accuracy_control), the operations whose int8 costs the most AP
go back to fp32 until the file's AP, as detr-custom-eval measures it, is within D AP points (AP x 100) of the fp32
file's; the figures (fp32 AP, int8 AP, drop, operations reverted) go in the metadata and are printed.
--winograd (fp32 files): the wide 3 x 3 convolutions computed by Winograd's F(4 x 4, 3 x 3) in the graph
(deploy/winograd.py): 4x fewer multiplications in them, outputs within the same tolerances.
The check: a padded batch of differently sized images and one image alone through the file and through PyTorch;
the largest difference of boxes must stay within --tolerance (default 1e-4), of logits relative to their largest
magnitude within --logits_tolerance (default 1e-3: eager PyTorch folds BatchNorm into the convolutions, the file runs
them apart, and the rounding differs), else nothing is written. A bf16 / int8 file is made from the checked fp32
graph; its differences are reported, and its accuracy is measured by detr-custom-eval on the file.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.image_processing_detr_custom import SIGMOID_TOP_K

from .runtimes import model_inputs

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
METADATA_KEY = "detr_custom"   # ONNX metadata_props key / OpenVINO rt_info section: processor, id2label, activation


class LogitsAndBoxes(torch.nn.Module):
    """The model with the exported signature: (pixel_values, pixel_mask) -> (logits, pred_boxes)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return outputs.logits, outputs.pred_boxes


class PostProcessed(torch.nn.Module):
    """The model and its post-processing (DetrCustomImageProcessor.post_process_object_detection at threshold 0):
    (pixel_values, pixel_mask, target_sizes [B, 2] (height, width) of the original images) -> scores [B, k],
    labels [B, k], boxes [B, k, 4] (x0, y0, x1, y1 in pixels of the original image, clipped to it), best first.
    Sigmoid heads: the k best (query, class) pairs; softmax heads: each query's best class, the k best queries."""

    def __init__(self, model: torch.nn.Module, activation: str, top_k: int):
        super().__init__()
        self.model, self.activation, self.top_k = model, activation, top_k

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, target_sizes: torch.Tensor):
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        logits, boxes = outputs.logits, outputs.pred_boxes
        center, half = boxes[..., :2], boxes[..., 2:] / 2
        height, width = target_sizes.to(boxes.dtype).unbind(1)                  # [batch]
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]   # [batch, 1, 4]
        xyxy = torch.minimum((torch.cat([center - half, center + half], -1) * scale).clamp(min=0), scale)
        if self.activation == "sigmoid":
            num_labels = logits.shape[-1]
            scores, index = logits.sigmoid().flatten(1).topk(self.top_k, dim=1)
            queries = torch.div(index, num_labels, rounding_mode="floor")
            labels = index % num_labels
        else:
            best, best_labels = logits.softmax(-1)[..., :-1].max(-1)             # [batch, queries]
            scores, queries = best.topk(self.top_k, dim=1)
            labels = best_labels.gather(1, queries)
        return scores, labels, xyxy.gather(1, queries[..., None].expand(-1, -1, 4))


def class_activation(model, processor) -> str:
    default = "sigmoid" if getattr(model.config, "classification_loss", "") in ("focal", "varifocal") else "softmax"
    return processor.class_activation or default


def metadata(model, processor: DetrCustomImageProcessor) -> str:
    """What a runtime needs besides the graph, as one json string."""
    settings = processor.to_dict()
    settings["class_activation"] = class_activation(model, processor)
    return json.dumps({"processor": settings, "id2label": {str(k): v for k, v in model.config.id2label.items()},
                       "num_queries": model.config.num_queries})


def check_images(seed: int = 0) -> list[np.ndarray]:
    """Three differently sized images (uint8 [height, width, 3]): pre-processed together they form a padded batch."""
    generator = np.random.default_rng(seed)
    return [generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for height, width in ((480, 640), (640, 400), (500, 500))]


def export_onnx(model, processor, output: Path, *, opset: int | None = None, batch_size: int | None = None,
                top_k: int | None = None) -> Path:
    """`model` (eval mode) -> `output` (.onnx, one file), with dynamic batch (unless batch_size), height and width.
    top_k: the post-processing in the graph too (`PostProcessed`): a third input `target_sizes`, outputs `scores`,
    `labels`, `boxes`."""
    from torch.export import Dim

    images = check_images(1)
    batch = [images[i % len(images)] for i in range(batch_size or 2)]
    pixel_values, pixel_mask = model_inputs(processor, batch)
    size = Dim.AUTO
    batch_dim = None if batch_size else Dim.AUTO
    dynamic = {"pixel_values": {0: batch_dim, 2: size, 3: size}, "pixel_mask": {0: batch_dim, 1: size, 2: size}}
    if batch_size:
        dynamic = {name: {axis: dim for axis, dim in axes.items() if dim is not None}
                   for name, axes in dynamic.items()}
    kwargs = {} if opset is None else {"opset_version": opset}
    module, inputs = LogitsAndBoxes(model), (pixel_values, pixel_mask)
    input_names, output_names = ["pixel_values", "pixel_mask"], ["logits", "pred_boxes"]
    if top_k is not None:
        module = PostProcessed(model, class_activation(model, processor), top_k)
        inputs += (torch.tensor([image.shape[:2] for image in batch]),)
        input_names, output_names = input_names + ["target_sizes"], ["scores", "labels", "boxes"]
        dynamic["target_sizes"] = {0: batch_dim} if batch_dim is not None else {}
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic, external_data=False, **kwargs)
    program.save(str(output), external_data=False)
    import onnx

    proto = onnx.load(str(output))
    entry = proto.metadata_props.add()
    settings = json.loads(metadata(model, processor))
    if top_k is not None:
        settings["top_k"] = top_k          # post-processed in the graph
    entry.key, entry.value = METADATA_KEY, json.dumps(settings)
    onnx.save(proto, str(output))
    return output


def onnx_to_openvino(onnx_file: Path, output: Path) -> Path:
    """An ONNX file -> an OpenVINO IR (`output` .xml and its .bin), fp32 weights, the same metadata in rt_info."""
    import onnx
    import openvino

    model = openvino.convert_model(str(onnx_file))
    props = {entry.key: entry.value for entry in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    model.set_rt_info(props[METADATA_KEY], [METADATA_KEY])
    openvino.save_model(model, str(output), compress_to_fp16=False)
    return output


PRECISIONS = ("fp32", "bf16", "int8")


def set_precision(model, precision: str, *, accuracy_control: dict | None = None) -> None:
    """Records in an OpenVINO model's metadata the precision it is compiled at (exported.PRECISIONS) and, for an
    accuracy-controlled int8 file, `int8_accuracy_control`: fp32_AP, int8_AP, ap_drop (AP points), max_ap_drop,
    validation_images, int8_AP_before_control (every operation of the scope quantized), quantized_operations,
    reverted_operations and the reverted operations' names."""
    settings = json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
    settings["precision"] = precision
    if accuracy_control:
        settings["int8_accuracy_control"] = accuracy_control
    model.set_rt_info(json.dumps(settings), [METADATA_KEY])


def calibration_images(folder: str, count: int) -> list[Path]:
    """Up to `count` images of `folder` (and its globs), evenly spread over the sorted files."""
    from .predict import IMAGE_SUFFIXES, expand_inputs

    files = [path for path in expand_inputs([folder]) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"--calibration_data {folder}: no image in it (images: {', '.join(IMAGE_SUFFIXES)}).")
    step = max(1, len(files) // count)
    return files[::step][:count]


# Post-training int8 (NNCF) settings, chosen on the demo model (MobileNetV2 + deformable decoder) against its fp32 AP
# (docs/deploy.md): depthwise convolutions (OpenVINO's GroupConvolution: one filter per channel, whose per-tensor
# int8 ranges lose the small channels) stay in floating point, as do the types of `INT8_SCOPES[scope]`; activation
# ranges are the calibration images' mean 0.01% / 99.99% quantiles instead of their extremes.
INT8_SCOPES = {"full": ("GroupConvolution",), "transformer": ("GroupConvolution", "Convolution")}


def check_int8_scope(scope: str) -> None:
    if scope not in INT8_SCOPES:
        raise ValueError(f"--int8_scope must be one of {sorted(INT8_SCOPES)}, got {scope!r}.")


def quantize_model(model, items: list, transform=None, *, scope: str = "full"):
    """An OpenVINO fp32 model -> its int8 version (NNCF post-training quantization): the inputs (input name ->
    array) that `transform` makes of each of `items` (the items themselves without it) set the activation ranges.
    scope: "full" (every matrix multiplication and convolution but the depthwise ones in int8) or "transformer" (the
    matrix multiplications only: every convolution, the backbone's, stays in floating point). Softmax,
    normalizations and sigmoids stay in floating point (NNCF's transformer patterns)."""
    import nncf

    settings = quantization_settings(scope)
    return nncf.quantize(model, nncf.Dataset(items, transform), subset_size=len(items),
                         advanced_parameters=settings.pop("advanced_quantization_parameters"), **settings)


def quantization_settings(scope: str) -> dict:
    """nncf.quantize's / nncf.quantize_with_accuracy_control's keyword arguments for an int8 scope (see above)."""
    check_int8_scope(scope)
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return {"model_type": nncf.ModelType.TRANSFORMER, "fast_bias_correction": False,
            "ignored_scope": nncf.IgnoredScope(types=list(INT8_SCOPES[scope]), validate=False),
            "advanced_quantization_parameters": AdvancedQuantizationParameters(
                activations_range_estimator_params=RangeEstimatorParametersSet.MEAN_QUANTILE)}


def quantized_operations(model) -> set[str]:
    """The operations of an OpenVINO model that run in int8, found as NNCF's accuracy-control report counts them,
    less the shape arithmetic it also counts: the quantizable operations (convolutions, matrix multiplications, ...)
    a FakeQuantize (NNCF's quantizer) feeds, directly or through operations that do not compute (reshapes,
    transposes, ...), not through a ShapeOf."""
    from nncf.openvino.graph.metatypes.groups import FAKE_QUANTIZE_OPERATIONS, INPUTS_QUANTIZABLE_OPERATIONS
    from nncf.openvino.graph.nncf_graph_builder import GraphConverter

    graph = GraphConverter.create_nncf_graph(model)
    found, seen = set(), set()
    to_see = [node for quantizer in graph.get_nodes_by_metatypes(FAKE_QUANTIZE_OPERATIONS)
              for node in graph.get_next_nodes(quantizer)]
    while to_see:
        node = to_see.pop()
        if node.node_name in seen:
            continue
        seen.add(node.node_name)
        if node.metatype in INPUTS_QUANTIZABLE_OPERATIONS:
            found.add(node.node_name)
        elif node.node_type != "ShapeOf":      # what follows a ShapeOf computes on shapes, not on int8 values
            to_see.extend(graph.get_next_nodes(node))
    return found


def quantize_with_ap_control(model, items: list, transform, validation, processor, *, max_ap_drop: float,
                             scope: str = "full", scratch: str) -> tuple:
    """An OpenVINO fp32 model -> (its int8 version within `max_ap_drop` AP points (AP x 100) of the fp32 model's COCO
    AP on `validation` (deploy.evaluate.ValidationSet), the accuracy-control record). NNCF's
    quantize_with_accuracy_control: `quantize_model`'s quantization of `scope`, then, while the AP drops by more than
    max_ap_drop, the quantized operations whose reverting to fp32 restores the most AP (ranked on the validation
    images) are reverted, one group at a time. The AP is detr-custom-eval's (deploy.evaluate.score_forward, the
    models compiled at fp32 as predict and eval compile an int8 file): the record's figures are the ones
    detr-custom-eval prints for the written file."""
    import nncf
    import openvino
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    from .evaluate import score_forward
    from .exported import PRECISIONS as COMPILE_SETTINGS
    from .exported import openvino_forward

    def ap_points(compiled, indices) -> tuple[float, None]:
        indices = [int(index) for index in indices]
        metrics, _ = score_forward(openvino_forward(compiled), processor, validation, indices=indices)
        return 100 * metrics["AP"], None

    def validate(network) -> float:
        compiled = openvino.Core().compile_model(network, "CPU", COMPILE_SETTINGS["int8"])
        return ap_points(compiled, range(len(validation.dataset)))[0]

    settings = quantization_settings(scope)
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(items, transform), nncf.Dataset(list(range(len(validation.dataset)))), ap_points,
        max_drop=max_ap_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(items),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(intermediate_model_dir=scratch),
        **settings)
    first = openvino.Core().read_model(str(Path(scratch) / "intermediate_model.xml"))   # before any reverting
    quantized_first = quantized_operations(first)
    reverted = quantized_first - quantized_operations(quantized)
    fp32_ap, int8_ap, first_ap = validate(model), validate(quantized), validate(first)
    record = {"max_ap_drop": max_ap_drop, "fp32_AP": fp32_ap / 100, "int8_AP": int8_ap / 100,
              "ap_drop": fp32_ap - int8_ap, "validation_images": len(validation.dataset), "int8_scope": scope,
              "int8_AP_before_control": first_ap / 100, "quantized_operations": len(quantized_first),
              "reverted_operations": len(reverted), "reverted": sorted(reverted)}
    if fp32_ap - int8_ap > max_ap_drop + 1e-9:
        raise RuntimeError(f"int8 accuracy control could not keep the AP within {max_ap_drop} points of fp32's "
                           f"({record}); nothing was written. Export at --precision fp32 or bf16, or allow a larger "
                           "--int8_max_ap_drop.")
    return quantized, record


def quantize_int8(xml: Path, output: Path, processor, calibration_data: str, *, calibration_size: int = 300,
                  scope: str = "full", max_ap_drop: float | None = None, validation=None) -> Path:
    """Post-training int8 quantization (`quantize_model`) of the exported graph: activation ranges from the
    calibration images (training images: never the data the model is scored on), pre-processed by the model's
    processor, one at a time. `xml`: the fp32 OpenVINO file; writes `output` (.xml + .bin) with "int8" in its
    metadata. max_ap_drop (with validation, a deploy.evaluate.ValidationSet): accuracy control
    (`quantize_with_ap_control`), whose record goes in the metadata too (`accuracy_control_record`)."""
    import openvino
    import PIL.Image
    import PIL.ImageOps

    def transform(path):
        with PIL.Image.open(path) as image:
            picture = PIL.ImageOps.exif_transpose(image).convert("RGB")
        pixel_values, pixel_mask = model_inputs(processor, [picture])
        return {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}

    files = calibration_images(calibration_data, calibration_size)
    model, record = openvino.Core().read_model(str(xml)), {}
    if max_ap_drop is None:
        quantized = quantize_model(model, files, transform, scope=scope)
    else:
        with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
            quantized, record = quantize_with_ap_control(model, files, transform, validation, processor,
                                                         max_ap_drop=max_ap_drop, scope=scope, scratch=scratch)
    set_precision(quantized, "int8", accuracy_control=record or None)
    openvino.save_model(quantized, str(output), compress_to_fp16=False)
    return output


def accuracy_control_record(xml: Path) -> dict:
    """An OpenVINO file's int8 accuracy-control record (`set_precision`), {} when it has none."""
    import openvino

    settings = json.loads(openvino.Core().read_model(str(xml)).get_rt_info([METADATA_KEY]).astype(str))
    return settings.get("int8_accuracy_control", {})


def largest_differences(model, processor, file: Path, *, batch_size: int | None = None) -> dict:
    """The largest |file - PyTorch| of pred_boxes, and of logits relative to their largest magnitude (at least 1), on
    a padded batch of differently sized images (3, or the fixed batch size) and on one image alone (where the batch
    is dynamic or 1). A post-processed file: of scores, and of boxes relative to the image size (`logits` and
    `pred_boxes` then hold those), against post_process_object_detection at threshold 0 and the file's top_k, with
    the labels checked equal."""
    from .exported import load_exported

    runner = load_exported(file)
    images = check_images()
    checks = {"padded batch": [images[i % len(images)] for i in range(batch_size or len(images))]}
    if batch_size in (None, 1):
        checks["one image"] = images[:1]
    differences = {}
    for name, batch in checks.items():
        pixel_values, pixel_mask = model_inputs(processor, batch)
        inputs = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        with torch.no_grad():
            expected = model(**inputs)
        if runner.postprocessed:
            sizes = torch.tensor([image.shape[:2] for image in batch])
            got = runner.forward(**inputs, target_sizes=sizes)
            top_k = got["scores"].shape[1]
            reference = processor.post_process_object_detection(expected, threshold=0.0, target_sizes=sizes,
                                                                top_k=top_k, class_activation=runner.processor
                                                                .class_activation, nms_iou_threshold=1.0)
            scale = sizes.flip(1).repeat(1, 2)[:, None, :].float()           # [batch, 1, 4]: w, h, w, h
            ref_scores = torch.stack([r["scores"] for r in reference])
            ref_boxes = torch.stack([r["boxes"] for r in reference])
            labels_equal = all(torch.equal(r["labels"], g) for r, g in zip(reference, got["labels"]))
            differences[name] = {"logits": (ref_scores - got["scores"]).abs().max().item(),
                                 "pred_boxes": ((ref_boxes - got["boxes"]) / scale).abs().max().item()
                                 if labels_equal else float("inf")}
            continue
        got = runner.forward(**inputs)
        scale = max(1.0, expected.logits.abs().max().item())   # logits: relative to their magnitude
        differences[name] = {"logits": (expected.logits - got["logits"]).abs().max().item() / scale,
                             "pred_boxes": (expected.pred_boxes - got["pred_boxes"]).abs().max().item()}
    return differences


def export(model_path: str, format: str, output: str, *, opset: int | None = None, batch_size: int | None = None,
           tolerance: float = 1e-4, logits_tolerance: float = 1e-3, precision: str = "fp32",
           calibration_data: str | None = None, calibration_size: int = 300, int8_scope: str = "full",
           postprocess: bool = False, top_k: int | None = None, int8_max_ap_drop: float | None = None,
           validation_data: dict | None = None, winograd: bool = False) -> dict:
    """The Python function behind detr-custom-export; returns the report (file, differences, seconds). The fp32
    graph is checked against PyTorch within the tolerances; a bf16 / int8 file's differences are reported, not
    bounded (its accuracy is measured by detr-custom-eval on the file). int8_max_ap_drop with validation_data
    (deploy.evaluate.load_validation's arguments: data_dir, or val_annotation_file and val_image_dir, or
    dataset_name with bbox_format): int8 accuracy control, the file's AP on that data within int8_max_ap_drop AP
    points (AP x 100) of the fp32 file's (`quantize_with_ap_control`; the report's `int8_accuracy_control`).
    winograd: the exported graph computes its eligible 3 x 3 convolutions by Winograd's F(4 x 4, 3 x 3)
    (deploy/winograd.py; fp32 only), checked as any file; the report's `winograd_convolutions` counts them."""
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {sorted(FORMATS)}, got {format!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision != "fp32" and format != "openvino":
        raise ValueError(f"--precision {precision} is for --format openvino; ONNX files are fp32.")
    if (precision == "int8") != (calibration_data is not None):
        raise ValueError("--precision int8 needs --calibration_data (a folder of training images), and "
                         "--calibration_data is only for --precision int8.")
    check_accuracy_control(precision, int8_max_ap_drop, validation_data, postprocess=postprocess or top_k is not None)
    check_int8_scope(int8_scope)
    check_winograd(winograd, precision)
    if calibration_size < 1:
        raise ValueError(f"--calibration_size must be >= 1, got {calibration_size}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}.")
    output = Path(output)
    if output.suffix.lower() != FORMATS[format]:
        raise ValueError(f"--output {output}: a {format} file ends in {FORMATS[format]}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1 (or left out: dynamic), got {batch_size}.")
    started = time.perf_counter()
    model = DetrCustomForObjectDetection.from_pretrained(model_path).eval()
    processor = DetrCustomImageProcessor.from_pretrained(model_path)
    validation = None
    if int8_max_ap_drop is not None:   # read and checked before the export: bad data fails at once
        from .evaluate import validation_set

        validation = validation_set(model.config.id2label, model.config.num_queries, **validation_data)
        check_calibration_apart(calibration_images(calibration_data, calibration_size), validation, calibration_data)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        if postprocess or top_k is not None:
            sigmoid = class_activation(model, processor) == "sigmoid"
            pairs = model.config.num_queries * (model.config.num_labels if sigmoid else 1)
            top_k = min(top_k or (SIGMOID_TOP_K if sigmoid else model.config.num_queries), pairs)
        export_onnx(model, processor, onnx_file, opset=opset, batch_size=batch_size, top_k=top_k)
        winograd_convolutions = winograd_file(onnx_file) if winograd else 0
        written = Path(scratch) / output.name
        if format == "onnx":
            written = onnx_file
        else:
            onnx_to_openvino(onnx_file, written)
        differences = largest_differences(model, processor, written, batch_size=batch_size)
        worst = {key: max(d[key] for d in differences.values()) for key in ("pred_boxes", "logits")}
        if not (worst["pred_boxes"] <= tolerance and worst["logits"] <= logits_tolerance):
            raise RuntimeError(f"The exported {format} file disagrees with PyTorch: boxes by "
                               f"{worst['pred_boxes']:.3g} (tolerance {tolerance:g}), logits by "
                               f"{worst['logits']:.3g} (tolerance {logits_tolerance:g}), on {differences}; nothing "
                               f"was written to {output}.")
        reduced, accuracy_control = {}, {}
        if precision != "fp32":
            import openvino

            # a name of its own: read_model maps the fp32 file's weights, which must outlive the save
            fp32_file, written = written, Path(scratch) / f"{precision}_{output.name}"
            if precision == "int8":
                quantize_int8(fp32_file, written, processor, calibration_data, calibration_size=calibration_size,
                              scope=int8_scope, max_ap_drop=int8_max_ap_drop, validation=validation)
                accuracy_control = accuracy_control_record(written)
            else:
                model_ir = openvino.Core().read_model(str(fp32_file))
                set_precision(model_ir, precision)
                openvino.save_model(model_ir, str(written), compress_to_fp16=False)
            reduced = largest_differences(model, processor, written, batch_size=batch_size)
        written.replace(output)
        if format == "openvino":
            written.with_suffix(".bin").replace(output.with_suffix(".bin"))
    dynamic = "height and width" if batch_size else "batch, height and width"
    return {"file": str(output), "format": format, "precision": precision, "differences": differences,
            "largest_differences": worst, "reduced_precision_differences": reduced, "dynamic": dynamic,
            "batch_size": batch_size, "top_k": top_k, "int8_accuracy_control": accuracy_control,
            "winograd_convolutions": winograd_convolutions,
            "seconds": time.perf_counter() - started}


def check_winograd(winograd: bool, precision: str) -> None:
    if winograd and precision != "fp32":
        raise ValueError(f"--winograd is for fp32 files, not --precision {precision}: its transforms scale values "
                         f"by up to 100, which bf16 / int8 rounding would magnify. Leave out one of them.")


def winograd_file(onnx_file: Path) -> int:
    """Rewrites the exported ONNX file's eligible convolutions to Winograd's F(4 x 4, 3 x 3) (deploy/winograd.py);
    returns how many. A graph without any (narrow or strided convolutions only) is refused: the flag would change
    nothing."""
    from .winograd import MIN_IN_CHANNELS, winograd_onnx

    count = winograd_onnx(onnx_file)
    if count == 0:
        raise ValueError(f"--winograd: this model has no 3 x 3, stride 1 convolution with at least "
                         f"{MIN_IN_CHANNELS} input channels; export it without --winograd.")
    return count


def check_calibration_apart(files: list[Path], validation, calibration_data: str) -> None:
    """Calibration images that are also validation images (deploy.evaluate.ValidationSet) would make the AP that
    accuracy control holds optimistic: an error naming one."""
    validation_files = {Path(image["path"]).resolve() for image in validation.dataset["image"] if image.get("path")}
    shared = sorted(str(path) for path in files if path.resolve() in validation_files)
    if shared:
        raise ValueError(f"--calibration_data {calibration_data}: {len(shared)} of its images are validation images "
                         f"(e.g. {shared[0]}); the AP that --int8_max_ap_drop holds would be measured on the images "
                         "that set the int8 ranges. Calibrate on training images (e.g. DATA_DIR/train2017).")


VALIDATION_SOURCES = ("data_dir", "val_annotation_file", "val_image_dir", "dataset_name")


def check_accuracy_control(precision: str, max_ap_drop: float | None, validation_data: dict | None, *,
                           postprocess: bool = False) -> None:
    """int8 accuracy control's arguments go together: --int8_max_ap_drop (>= 0) with --precision int8 and
    validation data, without the post-processing in the graph."""
    has_data = any((validation_data or {}).get(name) for name in VALIDATION_SOURCES)
    if max_ap_drop is None:
        if has_data:
            raise ValueError("Validation data (--data_dir, --val_annotation_file / --val_image_dir, --dataset_name) "
                             "is for int8 accuracy control: give --int8_max_ap_drop too (e.g. 0.5 AP points), or "
                             "leave the data out.")
        return
    if precision != "int8":
        raise ValueError(f"--int8_max_ap_drop is for --precision int8 (got --precision {precision}): an {precision} "
                         "file is not quantized; measure its AP with detr-custom-eval.")
    if not max_ap_drop >= 0:
        raise ValueError(f"--int8_max_ap_drop is the AP drop allowed, in AP points (AP x 100: 0.5 allows 0.6480 -> "
                         f"0.6430), >= 0; got {max_ap_drop}.")
    if postprocess:
        raise ValueError("--int8_max_ap_drop scores the file as detr-custom-eval does, on logits and pred_boxes: "
                         "leave out --postprocess / --top_k (export a post-processed file at fp32 or plain int8).")
    if not has_data:
        raise ValueError("--int8_max_ap_drop needs validation data to measure the AP on, as detr-custom-eval takes "
                         "it: --data_dir DIR (COCO layout, its val split), --val_annotation_file with "
                         "--val_image_dir, or --dataset_name with --bbox_format. Not the --calibration_data images.")


def parse_args(argv=None) -> argparse.Namespace:
    from .evaluate import add_validation_arguments, validation_arguments

    parser = argparse.ArgumentParser(prog="detr-custom-export", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a saved folder (best/, last/) or a transformers DETR / RT-DETR folder")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--output", required=True, help="the file: .onnx, or .xml for OpenVINO (.bin beside it)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--batch_size", type=int, help="a fixed batch size (default: dynamic)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest difference from PyTorch allowed on the check's boxes (cx, cy, w, h in [0, 1])")
    parser.add_argument("--logits_tolerance", type=float, default=1e-3,
                        help="the same for logits, relative to their largest magnitude (at least 1)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="OpenVINO: the arithmetic the file runs at. bf16: fp32 weights, bf16 compute (CPUs with "
                             "AVX512_BF16 or AMX); int8: post-training quantization (NNCF) calibrated on "
                             "--calibration_data")
    parser.add_argument("--calibration_data", help="with --precision int8: a folder (or glob) of training images "
                                                   "that set the int8 ranges (not the images the model is scored on)")
    parser.add_argument("--calibration_size", type=int, default=300, help="images used from --calibration_data")
    parser.add_argument("--int8_scope", default="full", choices=sorted(INT8_SCOPES),
                        help="with --precision int8: full (every matrix multiplication and convolution but the "
                             "depthwise ones: the speed) or transformer (the matrix multiplications only, the "
                             "convolutions in floating point: the accuracy; docs/deploy.md gives both)")
    parser.add_argument("--int8_max_ap_drop", type=float,
                        help="with --precision int8: accuracy control (NNCF's quantize_with_accuracy_control). The "
                             "int8 file's COCO AP on the validation data (--data_dir or --val_annotation_file / "
                             "--val_image_dir or --dataset_name, as detr-custom-eval takes them) stays within this "
                             "many AP points (AP x 100) of the fp32 file's: the quantized operations that cost the "
                             "most AP are reverted to fp32 until it does")
    add_validation_arguments(parser, purpose="int8 accuracy control's validation data: ")
    parser.add_argument("--winograd", action="store_true",
                        help="fp32: compute the 3 x 3, stride 1 convolutions with at least 128 input channels by "
                             "Winograd's F(4 x 4, 3 x 3) in the graph: 4x fewer multiplications in them, outputs "
                             "checked within the same tolerances (docs/deploy.md: the speed it buys per runtime)")
    parser.add_argument("--postprocess", action="store_true",
                        help="the post-processing in the graph: a third input target_sizes [batch, 2] (the original "
                             "images' height, width), outputs scores, labels, boxes (x0, y0, x1, y1 pixels), the "
                             "top_k best first")
    parser.add_argument("--top_k", type=int, help="with the post-processing: detections per image (default: 100 "
                                                  "(query, class) pairs of sigmoid heads, every query of softmax "
                                                  "heads); implies --postprocess")
    args = parser.parse_args(argv)
    args.validation_data = validation_arguments(args)
    try:
        check_accuracy_control(args.precision, args.int8_max_ap_drop, args.validation_data,
                               postprocess=args.postprocess or args.top_k is not None)
        check_winograd(args.winograd, args.precision)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = export(args.model, args.format, args.output, opset=args.opset, batch_size=args.batch_size,
                        tolerance=args.tolerance, logits_tolerance=args.logits_tolerance, precision=args.precision,
                        calibration_data=args.calibration_data, calibration_size=args.calibration_size,
                        int8_scope=args.int8_scope, postprocess=args.postprocess, top_k=args.top_k,
                        int8_max_ap_drop=args.int8_max_ap_drop, validation_data=args.validation_data,
                        winograd=args.winograd)
    except (ValueError, RuntimeError) as error:
        print(f"detr-custom-export: {error}", file=sys.stderr)
        return 2
    graph = f"post-processed, top {report['top_k']}; " if report["top_k"] else ""
    if report["winograd_convolutions"]:
        graph += f"{report['winograd_convolutions']} convolutions by Winograd F(4x4, 3x3); "
    print(f"wrote {report['file']} ({report['format']}, {report['precision']}; {graph}dynamic {report['dynamic']}) "
          f"in {report['seconds']:.0f} s")
    for name, difference in report["differences"].items():
        print(f"  checked against PyTorch on {name}: largest difference logits {difference['logits']:.2e}, "
              f"boxes {difference['pred_boxes']:.2e}")
    for name, difference in report["reduced_precision_differences"].items():
        print(f"  at {report['precision']} on {name}: largest difference logits {difference['logits']:.2e}, "
              f"boxes {difference['pred_boxes']:.2e} (reduced precision: measure its AP with detr-custom-eval)")
    control = report["int8_accuracy_control"]
    if control:
        print(f"  int8 accuracy control on {control['validation_images']} validation images: fp32 AP "
              f"{control['fp32_AP']:.4f}, int8 AP {control['int8_AP']:.4f}, drop {control['ap_drop']:.2f} AP points "
              f"(allowed {control['max_ap_drop']:g}); {control['reverted_operations']} of "
              f"{control['quantized_operations']} quantized operations reverted to fp32 (int8 AP before: "
              f"{control['int8_AP_before_control']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
