"""Loading original facebookresearch/detr checkpoints into DetrCustomForObjectDetection, and the CLI.

- original facebookresearch/detr checkpoints (`{"model": state_dict, "args": Namespace?}`):
  `python -m modeling_detr_custom.convert --original detr-r50-e632da11.pth --output-dir detr-r50`
  (also installed as `detr-custom-convert`).
- transformers' DetrForObjectDetection folders / Hub ids (model_type "detr", e.g. facebook/detr-resnet-50) need no
  step: `DetrCustomForObjectDetection.from_pretrained` converts them on the fly (`checkpoint_conversion.py`).

A layer above the model: this file imports the model, the model never imports it (so it is not part of the remote
code that `save_pretrained` writes).
"""
import argparse
import re

import torch

from .checkpoint_conversion import check_converted_keys, convert_original_state_dict
from .configuration_detr_custom import DetrCustomConfig
from .modeling_detr_custom import DetrCustomForObjectDetection

# COCO 2017 category names by id (ids 1..90 with gaps), for original checkpoints trained on COCO (91 outputs)
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant N/A stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe N/A backpack umbrella N/A N/A "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle N/A wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed N/A dining_table N/A N/A toilet N/A tv laptop mouse "
    "remote keyboard cell_phone microwave oven toaster sink refrigerator N/A book clock vase scissors teddy_bear "
    "hair_drier toothbrush"
).split()


def _infer_resnet(state_dict: dict) -> str:
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.0\.body\.layer3\.(\d+)\.", k))}
    bottleneck = any(".conv3." in k for k in state_dict if k.startswith("backbone.0.body.layer1."))
    names = {(True, 6): "resnet50", (True, 23): "resnet101", (True, 36): "resnet152",
             (False, 2): "resnet18", (False, 6): "resnet34"}
    if (bottleneck, len(blocks)) not in names:
        raise ValueError("cannot infer the ResNet depth from the checkpoint; pass --backbone.")
    return names[(bottleneck, len(blocks))]


def convert_original_checkpoint(checkpoint_path, output_dir=None, backbone=None, dilation=None, num_heads=None):
    """Reads an original facebookresearch/detr checkpoint (`torch.load(weights_only=True)`) and returns our
    DetrCustomForObjectDetection with its weights (saved with save_pretrained to `output_dir` when given).

    The number of classes, queries, layers and widths are read from the weights; backbone, dilation, heads and
    auxiliary loss from the checkpoint's `args` when present, else from the arguments (defaults: the ResNet depth
    inferred from the weights, no dilation, 8 heads)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("model", checkpoint)
    if "class_embed.weight" not in state_dict:
        raise ValueError(f"{checkpoint_path} is not an original DETR checkpoint: no 'class_embed.weight' in it.")
    args = vars(checkpoint.get("args") or argparse.Namespace())
    if args.get("pre_norm"):
        raise ValueError("pre-norm DETR checkpoints (args.pre_norm=True) are not supported: our layers are post-norm.")
    if args.get("masks"):
        state_dict = {k[len("detr."):]: v for k, v in state_dict.items() if k.startswith("detr.")}

    def count(prefix):
        return 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(prefix + r"\.(\d+)\.", k)))

    num_labels = state_dict["class_embed.weight"].shape[0] - 1
    config = DetrCustomConfig(
        backbone=backbone or args.get("backbone") or _infer_resnet(state_dict),
        dilation=bool(dilation if dilation is not None else args.get("dilation", False)),
        use_pretrained_backbone=False,
        num_labels=num_labels,
        id2label={i: name for i, name in enumerate(COCO_NAMES, start=1)} | {0: "N/A"} if num_labels == 91 else None,
        num_queries=state_dict["query_embed.weight"].shape[0],
        d_model=state_dict["class_embed.weight"].shape[1],
        encoder_layers=count(r"transformer\.encoder\.layers"),
        decoder_layers=count(r"transformer\.decoder\.layers"),
        encoder_attention_heads=num_heads or args.get("nheads", 8),
        decoder_attention_heads=num_heads or args.get("nheads", 8),
        encoder_ffn_dim=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        decoder_ffn_dim=state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        position_embedding_type="learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        auxiliary_loss=args.get("aux_loss", True),
    )
    converted = convert_original_state_dict(state_dict)
    check_converted_keys(DetrCustomForObjectDetection, config, converted,
                         f"original DETR checkpoint {checkpoint_path}")
    model = DetrCustomForObjectDetection(config)
    model.load_state_dict(converted, strict=True)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert an original facebookresearch/detr checkpoint into a "
                                                 "Hugging Face folder loadable with from_pretrained.")
    parser.add_argument("--original", required=True, help="path to the .pth file (e.g. detr-r50-e632da11.pth)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--backbone", default=None, help="timm name, e.g. resnet50 or resnet101 (default: inferred)")
    parser.add_argument("--dilation", action="store_true", default=None, help="DC5 checkpoints")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (default: args or 8)")
    args = parser.parse_args(argv)
    model = convert_original_checkpoint(args.original, args.output_dir, args.backbone, args.dilation, args.num_heads)
    print(f"wrote {args.output_dir}: {model.config.backbone}, {model.config.num_labels} labels, "
          f"{model.config.num_queries} queries")


if __name__ == "__main__":
    main()
