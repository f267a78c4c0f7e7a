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
                    num_queries=meta.get("num_queries"))


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

    def forward(pixel_values, pixel_mask):
        logits, boxes = session.run(["logits", "pred_boxes"], {"pixel_values": pixel_values.float().numpy(),
                                                               "pixel_mask": pixel_mask.long().numpy()})
        return {"logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}

    return _detector(forward, props[METADATA_KEY], "onnxruntime", path)


def load_openvino(path: Path, *, threads: int | None = None, precision: str = "f32") -> Detector:
    """precision: "f32" (the default here: PyTorch's numbers) or "default" (the runtime's choice: bf16 on CPUs with
    AMX / AVX512_BF16, faster, not the same numbers)."""
    import openvino

    core = openvino.Core()
    model = core.read_model(str(path))
    if not model.has_rt_info([METADATA_KEY]):
        raise ValueError(f"{path} has no '{METADATA_KEY}' rt_info (processor settings, class names): it was not "
                         "written by detr-custom-export. Export the model folder with detr-custom-export.")
    settings = model.get_rt_info([METADATA_KEY]).astype(str)
    config = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def forward(pixel_values, pixel_mask):
        results = request.infer({"pixel_values": pixel_values.float().numpy(),
                                 "pixel_mask": pixel_mask.long().numpy()})
        return {"logits": torch.from_numpy(results[compiled.output("logits")].copy()),
                "pred_boxes": torch.from_numpy(results[compiled.output("pred_boxes")].copy())}

    return _detector(forward, settings, f"openvino ({precision})", path)


def load_exported(path, *, threads: int | None = None, precision: str = "f32") -> Detector:
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return load_onnx(path, threads=threads)
    if not os.path.isfile(path.with_suffix(".bin")):
        raise ValueError(f"{path}: its weights {path.with_suffix('.bin').name} are missing beside it.")
    return load_openvino(path, threads=threads, precision=precision)
