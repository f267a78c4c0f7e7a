"""Winograd convolutions in exported files: `detr-custom-export --winograd`.

A 3 x 3 convolution (stride 1, padding 1) computes each 4 x 4 block of its output from a 6 x 6 window of its input
with 144 multiplications per (input, output) channel pair when done directly; Winograd's minimal filtering
F(4 x 4, 3 x 3) needs 36: the window and the kernel are each transformed by fixed matrices (interpolation at 0, 1,
-1, 2, -2 and infinity), multiplied element by element and summed over the input channels (36 independent matrix
products: one grouped 1 x 1 convolution), and the products transformed back. The same arithmetic, rounded
differently: outputs differ from the direct convolution by about 1e-5 of their magnitude in fp32, so only fp32 files
use it (bf16 and int8 would magnify the transforms' rounding).

`winograd_onnx(path)` rewrites an exported ONNX file in place: each eligible `Conv` node (constant weights, at least
`MIN_IN_CHANNELS` input channels) becomes standard operators that compute the same convolution that way, its sizes
read from the input at run time (batch, height and width stay dynamic). Narrower layers stay direct: on them the
transforms' memory traffic costs more than the multiplications saved (measured in OpenVINO, docs/deploy.md).
"""
from pathlib import Path

import numpy as np

MIN_IN_CHANNELS = 128

# F(4 x 4, 3 x 3): input transform B^T (6 x 6), kernel transform G (6 x 3), output transform A^T (4 x 6)
INPUT_TRANSFORM = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                   (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
KERNEL_TRANSFORM = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                    (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
OUTPUT_TRANSFORM = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def transformed_weight(weight: np.ndarray) -> np.ndarray:
    """[out, in, 3, 3] -> the grouped 1 x 1 convolution's [36 * out, in, 1, 1] (group a * 6 + b: G w G^T at (a, b)),
    computed in float64."""
    kernel = np.array(KERNEL_TRANSFORM)
    transformed = np.einsum("ak,oikl,bl->aboi", kernel, weight.astype(np.float64), kernel)    # [6, 6, out, in]
    return transformed.reshape(36 * weight.shape[0], weight.shape[1], 1, 1).astype(weight.dtype)


def _attributes(node) -> dict:
    import onnx

    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def eligible(node, constants: dict) -> bool:
    """A Conv node that F(4 x 4, 3 x 3) computes exactly: constant 3 x 3 weights with at least MIN_IN_CHANNELS
    input channels, stride 1, dilation 1, padding 1 on every side, no groups, a constant bias or none."""
    if node.op_type != "Conv" or node.input[1] not in constants:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
        return False
    weight, settings = constants[node.input[1]], _attributes(node)
    auto_pad = settings.get("auto_pad", b"NOTSET")
    return (weight.ndim == 4 and weight.shape[2:] == (3, 3) and weight.shape[1] >= MIN_IN_CHANNELS
            and list(settings.get("strides", [1, 1])) == [1, 1] and list(settings.get("dilations", [1, 1])) == [1, 1]
            and list(settings.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1] and settings.get("group", 1) == 1
            and auto_pad in (b"NOTSET", "NOTSET"))


class _Builder:
    """Appends nodes and initializers named under one prefix."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.initializers, self.count = prefix, [], [], 0

    def name(self) -> str:
        self.count += 1
        return f"{self.prefix}_{self.count}"

    def constant(self, value, dtype=None) -> str:
        from onnx import numpy_helper

        name = self.name()
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or np.int64), name))
        return name

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attributes) -> str:
        import onnx

        output = output or self.name()
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), [output], name=f"{output}_node",
                                                **attributes))
        return output


def _replacement(node, weight: np.ndarray, bias: np.ndarray | None, prefix: str) -> _Builder:
    """The nodes computing `node` (a Conv, see `eligible`) by F(4 x 4, 3 x 3), writing its output name."""
    out_channels, channels = weight.shape[:2]
    b = _Builder(prefix)
    x = node.input[0]
    shape = b.op("Shape", x)
    batch = b.op("Slice", shape, b.constant([0]), b.constant([1]))
    height = b.op("Slice", shape, b.constant([2]), b.constant([3]))
    width = b.op("Slice", shape, b.constant([3]), b.constant([4]))
    one, three, four = b.constant([1]), b.constant([3]), b.constant([4])
    rows = b.op("Div", b.op("Add", height, three), four)           # blocks of 4 output rows / columns
    columns = b.op("Div", b.op("Add", width, three), four)
    rows1, columns1 = b.op("Add", rows, one), b.op("Add", columns, one)
    # one zero row / column before (the convolution's padding); after: whole blocks, plus one block of zeros
    bottom = b.op("Sub", b.op("Add", b.op("Mul", rows, four), three), height)
    right = b.op("Sub", b.op("Add", b.op("Mul", columns, four), three), width)
    pads = b.op("Concat", b.constant([0, 0, 1, 1, 0, 0]), bottom, right, axis=0)
    padded = b.op("Pad", x, pads)
    blocks = b.op("Reshape", padded, b.op("Concat", batch, b.constant([channels]), rows1, four, columns1, four, axis=0))
    # [batch, 4 row offsets, 4 column offsets, channels, rows + 1, columns + 1]
    blocks = b.op("Transpose", blocks, perm=[0, 3, 5, 1, 2, 4])
    two_to_end = b.constant([2, np.iinfo(np.int64).max])
    # window rows 0-3: the block's; 4-5: the first two of the block below (likewise for columns)
    window = b.op("Concat", b.op("Slice", blocks, b.constant([0]), b.constant([-1]), b.constant([4])),
                  b.op("Slice", blocks, b.constant([0, 1]), two_to_end,
                       b.constant([1, 4])), axis=1)
    input_transform = b.constant(np.array(INPUT_TRANSFORM), dtype=weight.dtype)
    flat = b.op("Reshape", window, b.op("Concat", batch, b.constant([6, -1]), axis=0))
    mixed = b.op("Reshape", b.op("MatMul", input_transform, flat),
                 b.op("Concat", batch, b.constant([6, 4, channels]), rows, columns1, axis=0))
    window = b.op("Concat", b.op("Slice", mixed, b.constant([0]), b.constant([-1]), b.constant([5])),
                  b.op("Slice", mixed, b.constant([0, 1]), two_to_end,
                       b.constant([2, 5])), axis=2)                  # [batch, 6, 6, channels, rows, columns]
    flat = b.op("Reshape", window, b.op("Concat", batch, b.constant([6, 6, -1]), axis=0))
    tiles = b.op("Reshape", b.op("MatMul", input_transform, flat),
                 b.op("Concat", batch, b.constant([36 * channels]), rows, columns, axis=0))
    products = b.op("Conv", tiles, b.constant(transformed_weight(weight), dtype=weight.dtype), group=36,
                    kernel_shape=[1, 1])
    output_transform = b.constant(np.array(OUTPUT_TRANSFORM), dtype=weight.dtype)
    flat = b.op("Reshape", products, b.op("Concat", batch, b.constant([6, -1]), axis=0))
    half = b.op("Reshape", b.op("MatMul", output_transform, flat),
                b.op("Concat", batch, b.constant([4, 6, -1]), axis=0))
    out = b.op("Reshape", b.op("MatMul", output_transform, half),
               b.op("Concat", batch, b.constant([4, 4, out_channels]), rows, columns, axis=0))
    out = b.op("Transpose", out, perm=[0, 3, 4, 1, 5, 2])           # [batch, out, rows, 4, columns, 4]
    out = b.op("Reshape", out, b.op("Concat", batch, b.constant([out_channels]), b.op("Mul", rows, four),
                                    b.op("Mul", columns, four), axis=0))
    zeros = b.constant([0, 0])
    crop_output = node.output[0] if bias is None else None
    out = b.op("Slice", out, zeros, b.op("Concat", height, width, axis=0), b.constant([2, 3]), output=crop_output)
    if bias is not None:
        b.op("Add", out, b.constant(bias.reshape(-1, 1, 1), dtype=weight.dtype), output=node.output[0])
    return b


def winograd_onnx(path: Path) -> int:
    """Rewrites the ONNX file at `path` in place: every `eligible` Conv node computed by F(4 x 4, 3 x 3); returns
    how many. The file's metadata and every other node are kept."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and _attributes(node).get("value") is not None:
            constants[node.output[0]] = numpy_helper.to_array(_attributes(node)["value"])
    nodes, count = [], 0
    for node in graph.node:
        if not eligible(node, constants):
            nodes.append(node)
            continue
        bias = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        builder = _replacement(node, constants[node.input[1]], bias, f"winograd{count}")
        nodes.extend(builder.nodes)
        graph.initializer.extend(builder.initializers)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]    # the replaced 3 x 3 weights go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return count
