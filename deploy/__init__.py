"""The deploy half: run a trained detector on images and videos (predict.py), evaluate it on a COCO validation set
(evaluate.py), export it to ONNX / OpenVINO (export.py). A layer above the model, as modeling_detr_custom/convert.py:
nothing in the model package imports it, so it never travels as remote code."""
