"""Pictures of a run: loss and mAP curves, and validation predictions next to the ground truth."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor  # noqa: E402

from .data.images import DECODE_ERRORS, decode_rgb  # noqa: E402


def plot_curves(train_history: list[dict], eval_history: list[dict], output_dir: Path) -> None:
    """loss_curve.png (the total and its unweighted terms) and map_curve.png (validation AP) against the step."""
    losses = {"loss": {"linewidth": 2}, "loss_ce": {"linewidth": 1}, "loss_focal": {"linewidth": 1},
              "loss_vfl": {"linewidth": 1}, "loss_bbox": {"linewidth": 1}, "loss_giou": {"linewidth": 1}}
    _plot_history(train_history, losses, output_dir / "loss_curve.png",
                  ylabel="loss (unweighted terms; total is weighted)", yscale="log")
    _plot_history(eval_history, {name: {"marker": "o"} for name in ("AP", "AP50", "AP75")},
                  output_dir / "map_curve.png", ylabel="COCO box metric (validation)", ylim=(0, 1))


def _plot_history(history: list[dict], styles: dict[str, dict], path: Path, *, ylabel: str, **axis_settings) -> None:
    """One line a name in `styles` (its keyword arguments to `plot`), over the records that have it."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, style in styles.items():
        points = [(r["step"], r[name]) for r in history if name in r]
        if points:
            axis.plot(*zip(*points), label=name, **style)
    axis.set(xlabel="optimizer step", ylabel=ylabel, **axis_settings)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _open(image) -> PIL.Image.Image | None:
    """The image as the model sees it (the processor's mode conversion and EXIF orientation, as training reads
    it), or None when it cannot be decoded (the collate has already named it)."""
    try:
        return PIL.Image.fromarray(decode_rgb(image))
    except DECODE_ERRORS:
        return None


@torch.no_grad()
def plot_predictions(model_dir: Path, val_dataset, categories, path: Path, num_images: int = 8,
                     threshold: float = 0.5) -> None:
    """Predicted boxes (class and score above `threshold`) on the left, ground truth on the right."""
    model = DetrCustomForObjectDetection.from_pretrained(model_dir).eval()
    processor = DetrCustomImageProcessor.from_pretrained(model_dir)
    rows, images = [], []
    for index in range(len(val_dataset)):   # the first num_images validation images that decode
        if len(rows) == num_images:
            break
        image = _open(val_dataset[index]["image"])
        if image is not None:
            rows.append(val_dataset[index])
            images.append(image)
    if not rows:
        return
    figure, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), squeeze=False)
    id_to_name = dict(zip(categories.ids, categories.names))
    for row, image, (left, right) in zip(rows, images, axes):
        inputs = processor(image, return_tensors="pt")
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        result = processor.post_process_object_detection(outputs, threshold=threshold,
                                                         target_sizes=[(image.height, image.width)])[0]
        for axis, title in ((left, "prediction"), (right, "ground truth")):
            axis.imshow(image)
            axis.set_title(f"image {row['image_id']}: {title}", fontsize=8)
            axis.axis("off")
        for score, label, (x0, y0, x1, y1) in zip(result["scores"], result["labels"], result["boxes"].tolist()):
            left.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", linewidth=1.5))
            left.text(x0, y0, f"{model.config.id2label[int(label)]} {score:.2f}", color="black", fontsize=6,
                      backgroundcolor="lime")
        objects = row["objects"]
        for (x, y, w, h), category_id in zip(objects["bbox"], objects["category_id"]):
            right.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="orange", linewidth=1.5))
            right.text(x, y, id_to_name.get(category_id, str(category_id)), color="black", fontsize=6,
                       backgroundcolor="orange")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
