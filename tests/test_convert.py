"""Original facebookresearch/detr checkpoints -> ours.

The original repository is not a dependency. The reference below is built from the parts the original is
made of (torchvision's ResNet with FrozenBatchNorm2d, torch.nn.MultiheadAttention, sequence-first post-norm
layers, its decoder that norms only the copies given to the heads), with the original's module names, so its
state_dict has the original key names and shapes. Its forward pass is the expected output.
"""
import argparse
import graphlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d
from transformers.models.detr.modeling_detr import DetrSinePositionEmbedding

from modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.convert import convert_original_checkpoint, main
from modeling_detr_custom.testing_utils import package_import_graph, padded_batch, randomize_


def test_package_imports_have_no_cycle_and_conversion_sits_above_the_model():
    graph = package_import_graph()
    assert set().union(*graph.values()) <= set(graph), "an import names a file that does not exist"
    graphlib.TopologicalSorter(graph).prepare()        # raises graphlib.CycleError on a cycle
    # convert.py (original .pth files, CLI) imports the model; nothing the model needs imports convert.py
    assert "modeling_detr_custom" in graph["convert"]
    assert [module for module, imports in graph.items() if "convert" in imports] == []
    assert not graph["checkpoint_conversion"] & {"modeling_detr_custom", "convert"}


class _EncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, src, padding_mask, pos):
        src = self.norm1(src + self.self_attn(src + pos, src + pos, src, key_padding_mask=padding_mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class _DecoderLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.self_attn, self.multihead_attn = nn.MultiheadAttention(d, heads), nn.MultiheadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt, memory, padding_mask, pos, query_pos):
        tgt = self.norm1(tgt + self.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=padding_mask)[0]
        tgt = self.norm2(tgt + attended)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class _Stack(nn.Module):
    def __init__(self, layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class OriginalStyleDetr(nn.Module):
    def __init__(self, resnet="resnet18", dilation=False, num_classes=91, d=32, heads=2, ffn=64, layers=2, queries=7,
                 learned=False):
        super().__init__()
        body = getattr(torchvision.models, resnet)(weights=None, norm_layer=FrozenBatchNorm2d,
                                                   replace_stride_with_dilation=[False, False, dilation])
        self.backbone = nn.ModuleList([nn.Module()])
        self.backbone[0].body = IntermediateLayerGetter(body, return_layers={"layer4": "0"})
        if learned:
            self.backbone.append(nn.Module())
            self.backbone[1].row_embed, self.backbone[1].col_embed = nn.Embedding(50, d // 2), nn.Embedding(50, d // 2)
        self.transformer = nn.Module()
        self.transformer.encoder = _Stack([_EncoderLayer(d, heads, ffn) for _ in range(layers)])
        self.transformer.decoder = _Stack([_DecoderLayer(d, heads, ffn) for _ in range(layers)], nn.LayerNorm(d))
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = _Stack([nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)])
        self.query_embed = nn.Embedding(queries, d)
        self.input_proj = nn.Conv2d(body.fc.in_features, d, kernel_size=1)
        self.learned = learned

    def forward(self, pixel_values, padding_mask):                    # padding_mask: True = padding (original)
        features = self.backbone[0].body(pixel_values)["0"]
        mask = F.interpolate(padding_mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        if self.learned:
            h, w = features.shape[-2:]
            x_emb, y_emb = self.backbone[1].col_embed.weight[:w], self.backbone[1].row_embed.weight[:h]
            pos = torch.cat([x_emb[None].repeat(h, 1, 1), y_emb[:, None].repeat(1, w, 1)], -1).permute(2, 0, 1)
            pos = pos[None].repeat(len(features), 1, 1, 1)
        else:
            pos = DetrSinePositionEmbedding(self.query_embed.weight.shape[1] // 2, normalize=True)(
                features.shape, features.device, features.dtype, ~mask)
        src = self.input_proj(features).flatten(2).permute(2, 0, 1)   # [sequence, batch, d]
        pos, flat_mask = pos.flatten(2).permute(2, 0, 1), mask.flatten(1)
        for layer in self.transformer.encoder.layers:
            src = layer(src, flat_mask, pos)
        query_pos = self.query_embed.weight[:, None].repeat(1, len(features), 1)
        tgt, intermediate = torch.zeros_like(query_pos), []
        for layer in self.transformer.decoder.layers:
            tgt = layer(tgt, src, flat_mask, pos, query_pos)
            intermediate.append(self.transformer.decoder.norm(tgt))   # the residual stream stays un-normed
        hs = torch.stack(intermediate).transpose(1, 2)                 # [layers, batch, queries, d]
        boxes = hs
        for i, layer in enumerate(self.bbox_embed.layers):
            boxes = layer(boxes) if i == 2 else F.relu(layer(boxes))
        return self.class_embed(hs), boxes.sigmoid()


CASES = [
    {"resnet": "resnet18"},
    {"resnet": "resnet18", "learned": True, "num_classes": 5},
    {"resnet": "resnet50", "dilation": True},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_original_checkpoint_converts_to_the_same_outputs(tmp_path, case):
    reference = randomize_(OriginalStyleDetr(**case)).eval()
    args = argparse.Namespace(backbone=case["resnet"], dilation=case.get("dilation", False), nheads=2, aux_loss=True,
                              pre_norm=False, masks=False,
                              position_embedding="learned" if case.get("learned") else "sine")
    torch.save({"model": reference.state_dict(), "args": args}, tmp_path / "detr.pth")
    main(["--original", str(tmp_path / "detr.pth"), "--output-dir", str(tmp_path / "converted")])
    ours = DetrCustomForObjectDetection.from_pretrained(tmp_path / "converted").eval()

    # every tensor lands where it should: in_proj is split into q, k, v; the rest is renamed one to one
    ours_state = ours.state_dict()
    for key, value in reference.state_dict().items():
        if key.endswith("in_proj_weight") or key.endswith("in_proj_bias"):
            prefix = key.rsplit(".", 1)[0].replace("transformer.", "model.").replace("multihead_attn", "cross_attn")
            kind = key.rsplit("_", 1)[-1]
            split = torch.cat([ours_state[f"{prefix}.{p}_proj.{kind}"] for p in "qkv"])
            assert torch.equal(split, value), key
    assert ours.config.num_labels == case.get("num_classes", 91) and ours.config.num_queries == 7
    assert ours.config.dilation == case.get("dilation", False)
    assert ours.config.position_embedding_type == ("learned" if case.get("learned") else "sine")

    pixel_values, pixel_mask, _ = padded_batch(height=128, width=96)
    with torch.no_grad():
        logits, boxes = reference(pixel_values, pixel_mask == 0)
        actual = ours(pixel_values, pixel_mask)
    assert (actual.logits - logits[-1]).abs().max() <= 1e-4
    assert (actual.pred_boxes - boxes[-1]).abs().max() <= 1e-4
    # auxiliary outputs follow the original decoder (residual stream never normed)
    assert (actual.auxiliary_outputs[0]["logits"] - logits[0]).abs().max() <= 1e-4


def test_checkpoint_without_args_infers_the_backbone(tmp_path):
    reference = OriginalStyleDetr(resnet="resnet18")
    torch.save({"model": reference.state_dict()}, tmp_path / "plain.pth")
    model = convert_original_checkpoint(tmp_path / "plain.pth", num_heads=2)
    assert model.config.backbone == "resnet18" and model.config.encoder_attention_heads == 2
    assert model.config.id2label[1] == "person" and model.config.id2label[90] == "toothbrush"


def test_not_a_detr_checkpoint(tmp_path):
    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an original DETR checkpoint"):
        convert_original_checkpoint(tmp_path / "other.pth")


def _saved_tiny_folder(path):
    from modeling_detr_custom import DetrCustomConfig
    from modeling_detr_custom.testing_utils import tiny_kwargs

    DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs())).save_pretrained(path)
    return path


def test_folder_without_config_json_is_a_clear_error(tmp_path):
    # before: a default ResNet-50 config, which ignore_mismatched_sizes=True then "loaded" with wrong-shaped weights
    folder = _saved_tiny_folder(tmp_path / "model")
    (folder / "config.json").unlink()
    for kwargs in ({}, {"ignore_mismatched_sizes": True}):
        with pytest.raises(FileNotFoundError, match=rf"the folder {folder} has no config.json.*save_pretrained"):
            DetrCustomForObjectDetection.from_pretrained(folder, **kwargs)
    from modeling_detr_custom import DetrCustomConfig
    from modeling_detr_custom.testing_utils import tiny_kwargs

    # an explicit config is the caller's answer
    loaded = DetrCustomForObjectDetection.from_pretrained(folder, config=DetrCustomConfig(**tiny_kwargs()))
    assert loaded.config.backbone == "resnet18"


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "~/no_such_folder_detr", "runs/a/b"])
def test_missing_local_folder_is_named(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder: .*no.such.folder|no such folder: .*runs/a/b"):
        DetrCustomForObjectDetection.from_pretrained(name)


def test_hub_ids_are_still_hub_ids(monkeypatch, tmp_path):
    from modeling_detr_custom.checkpoint_conversion import check_local_checkpoint

    monkeypatch.chdir(tmp_path)
    for name in ("facebook/detr-resnet-50", "detr-resnet-50"):
        check_local_checkpoint(name, {})     # not a folder, not a path: left to the Hub


@pytest.mark.parametrize("file_name, keep", [("config.json", 0.5), ("model.safetensors", 0.5),
                                             ("model.safetensors", 0.001)])
def test_truncated_files_are_named_as_damaged(tmp_path, file_name, keep):
    folder = _saved_tiny_folder(tmp_path / "model")
    data = (folder / file_name).read_bytes()
    (folder / file_name).write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(OSError, match=rf"{folder / file_name} is damaged.*Re-download or re-save"):
        DetrCustomForObjectDetection.from_pretrained(folder)
