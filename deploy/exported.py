"""Exported files (export.py) as a `Detector`: ONNX Runtime for .onnx, OpenVINO for .xml. The file's metadata gives
the processor settings, the class names and the class activation, so that pre- and post-processing are the
PyTorch folder's."""
import json
import os
from pathlib import Path

import torch

from modeling_detr_custom import DetrCustomImageProcessor

from .runtimes import Detector

METADATA_KEY = "detr_custom"


def _detector(forward, settings: str, runtime: str, path: Path) -> Detector:
    try:
        meta = json.loads(settings)
        processor = DetrCustomImageProcessor(**meta["processor"])
        id2label = {int(k): v for k, v in meta["id2label"].items()}
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: its '{METADATA_KEY}' metadata cannot be read ({type(error).__name__}: {error}); "
                         "export the model again with detr-custom-export.") from error
    return Detector(forward=forward, processor=processor, id2label=id2label, runtime=runtime, source=str(path),
                    num_queries=meta.get("num_queries"), postprocessed="top_k" in meta)


def load_onnx(path: Path, *, threads: int | None = None) -> Detector:
    import onnx
    import onnxruntime

    props = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata (processor settings, class names): it was not "
                         "written by detr-custom-export. Export the model folder with detr-custom-export.")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    names = [output.name for output in session.get_outputs()]    # logits, pred_boxes; or scores, labels, boxes

    def forward(pixel_values, pixel_mask, target_sizes=None):
        inputs = {"pixel_values": pixel_values.float().numpy(), "pixel_mask": pixel_mask.long().numpy()}
        if target_sizes is not None:
            inputs["target_sizes"] = torch.as_tensor(target_sizes).long().numpy()
        return {name: torch.from_numpy(value) for name, value in zip(names, session.run(names, inputs))}

    return _detector(forward, props[METADATA_KEY], "onnxruntime", path)


# precision (the file's, from its metadata, or the caller's) -> OpenVINO CPU compile settings. int8: the quantized
# operations in int8, the others in fp32 ("int8" files are written by `detr-custom-export --precision int8`)
PRECISIONS = {"fp32": {"INFERENCE_PRECISION_HINT": "f32"}, "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
              "int8": {"INFERENCE_PRECISION_HINT": "f32"}, "default": {}}


def file_precision(settings: str) -> str:
    """The precision an exported file was written for (its metadata's; files without one are fp32)."""
    try:
        return json.loads(settings).get("precision", "fp32")
    except (TypeError, ValueError, AttributeError):
        return "fp32"


def load_openvino(path: Path, *, threads: int | None = None, precision: str | None = None) -> Detector:
    """precision: None (the file's: fp32 unless exported with --precision bf16 / int8), "fp32" (PyTorch's numbers),
    "bf16" (bf16 arithmetic: needs AVX512_BF16 or AMX, else the runtime falls back to fp32), "int8" (a quantized
    file: its int8 operations, the rest in fp32) or "default" (the runtime's choice: bf16 on CPUs with AMX /
    AVX512_BF16)."""
    import openvino

    core = openvino.Core()
    model = core.read_model(str(path))
    if not model.has_rt_info([METADATA_KEY]):
        raise ValueError(f"{path} has no '{METADATA_KEY}' rt_info (processor settings, class names): it was not "
                         "written by detr-custom-export. Export the model folder with detr-custom-export.")
    settings = model.get_rt_info([METADATA_KEY]).astype(str)
    precision = precision or file_precision(settings)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}.")
    config = dict(PRECISIONS[precision])
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    forward = openvino_forward(core.compile_model(model, "CPU", config))
    return _detector(forward, settings, f"openvino ({precision})", path)


def openvino_forward(compiled):
    """A compiled OpenVINO model -> Detector.forward: torch tensors in, {output name: torch tensor} out."""
    request = compiled.create_infer_request()
    names = [output.get_any_name() for output in compiled.outputs]

    def forward(pixel_values, pixel_mask, target_sizes=None):
        inputs = {"pixel_values": pixel_values.float().numpy(), "pixel_mask": pixel_mask.long().numpy()}
        if target_sizes is not None:
            inputs["target_sizes"] = torch.as_tensor(target_sizes).long().numpy()
        results = request.infer(inputs)
        return {name: torch.from_numpy(results[compiled.output(name)].copy()) for name in names}

    return forward


def load_exported(path, *, threads: int | None = None, precision: str | None = None) -> Detector:
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if precision not in (None, "fp32"):
            raise ValueError(f"--precision {precision} applies to OpenVINO files; {path} runs in ONNX Runtime, fp32.")
        return load_onnx(path, threads=threads)
    if not os.path.isfile(path.with_suffix(".bin")):
        raise ValueError(f"{path}: its weights {path.with_suffix('.bin').name} are missing beside it.")
    return load_openvino(path, threads=threads, precision=precision)
