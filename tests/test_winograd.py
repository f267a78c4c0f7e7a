"""detr-custom-export --winograd: the rewritten ONNX graph computes the convolutions it replaces (any size, batch,
bias) in ONNX Runtime, only eligible convolutions are replaced, and a file exported with it equals PyTorch on a
padded batch in ONNX Runtime and OpenVINO, through the command; bad combinations are refused with the fix."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from test_export import model_of

from deploy import export as export_cli
from deploy import winograd
from deploy.winograd import INPUT_TRANSFORM, KERNEL_TRANSFORM, OUTPUT_TRANSFORM, winograd_onnx
from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor


def test_the_transforms_compute_a_3x3_correlation():
    """A^T [(G g G^T) * (B^T d B)] A = the 4 x 4 correlation of a 6 x 6 window d with a 3 x 3 kernel g, in float64."""
    generator = np.random.default_rng(0)
    window, kernel = generator.standard_normal((6, 6)), generator.standard_normal((3, 3))
    direct = np.array([[(window[i:i + 3, j:j + 3] * kernel).sum() for j in range(4)] for i in range(4)])
    b_t, g, a_t = np.array(INPUT_TRANSFORM), np.array(KERNEL_TRANSFORM), np.array(OUTPUT_TRANSFORM)
    got = a_t @ ((g @ kernel @ g.T) * (b_t @ window @ b_t.T)) @ a_t.T
    np.testing.assert_allclose(got, direct, atol=1e-12, rtol=0)


def _export(network, path, shape):
    from torch.export import Dim

    with torch.no_grad():
        torch.onnx.export(network.eval(), (torch.randn(*shape),), dynamo=True,
                          dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},)).save(str(path))
    return path


@pytest.mark.parametrize("bias", [True, False])
def test_the_rewritten_file_computes_the_same_convolutions(tmp_path, bias):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, padding=1, bias=bias), torch.nn.ReLU(),
                                  torch.nn.Conv2d(128, 24, 3, padding=1, bias=bias),   # narrow output: eligible
                                  torch.nn.Conv2d(24, 128, 3, padding=1)).eval()       # narrow input: direct
    path = _export(network, tmp_path / "network.onnx", (2, 128, 13, 17))
    assert winograd_onnx(path) == 2
    convs = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Conv"]
    assert len(convs) == 3 and sum(a.name == "group" and a.i == 36 for c in convs for a in c.attribute) == 2
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 128, 13, 17), (1, 128, 1, 1), (3, 128, 8, 5), (1, 128, 40, 41)]:   # sizes of no export
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = network(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), shape   # rounding only


def test_other_convolutions_stay_direct(tmp_path):
    kept = torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, stride=2, padding=1),
                               torch.nn.Conv2d(128, 128, 3, padding=1, groups=2),
                               torch.nn.Conv2d(128, 128, 3, padding=2, dilation=2),
                               torch.nn.Conv2d(128, 128, 5, padding=2), torch.nn.Conv2d(128, 128, 1),
                               torch.nn.Conv2d(128, 128, 3, padding=0))
    path = _export(kept, tmp_path / "kept.onnx", (1, 128, 16, 16))
    before = onnx.load(str(path)).graph.node
    assert winograd_onnx(path) == 0
    assert [node.op_type for node in onnx.load(str(path)).graph.node] == [node.op_type for node in before]


@pytest.mark.timeout(900)   # one export, converted, and its checks
def test_the_command_exports_a_winograd_file_that_equals_pytorch(tmp_path, capsys, monkeypatch):
    # the bar lowered below the hybrid encoder's 32 channels: its convolutions are rewritten too, not only the
    # ResNet-18's from 128 channels on
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 8)
    folder = tmp_path / "rtdetr"
    model_of("rtdetr").save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    output = tmp_path / "winograd.onnx"
    assert export_cli.main([str(folder), "--format", "onnx", "--output", str(output), "--winograd"]) == 0
    printed = capsys.readouterr().out
    groups = [attribute.i for node in onnx.load(str(output)).graph.node if node.op_type == "Conv"
              for attribute in node.attribute if attribute.name == "group"]
    rewritten = groups.count(36)            # the Winograd products: one grouped convolution per layer
    assert rewritten > 0 and f"{rewritten} convolutions by Winograd F(4x4, 3x3)" in printed, printed
    model = DetrCustomForObjectDetection.from_pretrained(folder).eval()
    processor = DetrCustomImageProcessor.from_pretrained(folder)
    for file in (output, export_cli.onnx_to_openvino(output, tmp_path / "winograd.xml")):
        for where, difference in export_cli.largest_differences(model, processor, file).items():
            assert difference["pred_boxes"] <= 1e-4 and difference["logits"] <= 1e-3, (file, where, difference)


def test_winograd_combinations_are_refused(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path / "absent"), "--format", "openvino", "--output", "m.xml", "--winograd",
                         "--precision", "bf16"])
    assert exit_info.value.code == 2 and "--winograd is for fp32 files" in capsys.readouterr().err
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 10_000)     # a model whose convolutions are all narrower
    folder = tmp_path / "narrow"
    model_of("rtdetr").save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    output = tmp_path / "m.onnx"
    assert export_cli.main([str(folder), "--format", "onnx", "--output", str(output), "--winograd"]) == 2
    assert "export it without --winograd" in capsys.readouterr().err and not output.exists()
