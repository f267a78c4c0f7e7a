"""Model card (README.md) of a training output folder, from its config.json and metrics.json.

`render_model_card(output_dir, hub_model_id=None, eval_step=None)` fills `model_card.jinja` through
huggingface_hub's `ModelCard.from_template` with Hub metadata (library, pipeline tag, tags, license, datasets,
base_model, and a model-index holding the COCO box metrics of the evaluation of this folder's weights, by default
`metrics.json["best"]`), writes `output_dir/README.md` and returns the `ModelCard`. Nothing is invented: what the
run did not record is left out, and a run without evaluation says so.

metrics.json (written by training/train.py): `{"run": {...recipe...}, "train_history": [{"step", "loss", ...}],
"eval_history": [{"step", "epoch", "AP", ..., "AP_per_class": {name: AP}}], "best": {same keys as an eval entry}}`.
COCO figures are fractions in [0, 1], and -1 means "no ground truth for this figure" (pycocotools): the table
shows it as "n/a" and the model-index leaves it out.

CLI: `python -m hub_cards.render OUTPUT_DIR [--hub-model-id NAME]`.
"""
import argparse
import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .card_text import (
    class_outputs,
    describe_architecture,
    describe_files,
    describe_origin,
    describe_post_processing,
    describe_recipe,
    describe_training_data,
    max_detections,
    measured,
    percent,
    sigmoid_head,
)

TEMPLATE_PATH = Path(__file__).with_name("model_card.jinja")
# metrics.json key -> (model-index metric type, as in transformers' object-detection example, display name)
MODEL_INDEX_METRICS = {
    "AP": ("map", "AP"), "AP50": ("map_50", "AP50"), "AP75": ("map_75", "AP75"),
    "AP_small": ("map_small", "AP (small)"), "AP_medium": ("map_medium", "AP (medium)"),
    "AP_large": ("map_large", "AP (large)"),
}
TABLE_ROWS = {
    "AP": "AP", "AP50": "AP50 (IoU 0.50)", "AP75": "AP75 (IoU 0.75)", "AP_small": "AP small (area < 32²)",
    "AP_medium": "AP medium (32² to 96²)", "AP_large": "AP large (area > 96²)", "AR1": "AR, 1 detection",
    "AR10": "AR, 10 detections", "AR100": "AR, 100 detections", "AR_small": "AR small", "AR_medium": "AR medium",
    "AR_large": "AR large",
}
TAGS = ("object-detection", "detr", "vision", "detr_custom", "custom_code")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} not found: the model card is rendered from {what}.")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def hub_id(value) -> str | None:
    """`value` if it names a Hub repository ("owner/name") rather than a local folder, else None."""
    if isinstance(value, str) and HUB_ID.match(value) and not Path(value).exists():
        return value
    return None


def _eval_results(evaluation: dict, dataset_id: str | None, dataset_name: str,
                  split: str | None) -> list[EvalResult]:
    return [
        EvalResult(task_type="object-detection", task_name="Object Detection", dataset_type=dataset_id or "custom",
                   dataset_name=dataset_name, dataset_split=split, metric_type=metric_type,
                   metric_name=metric_name, metric_value=evaluation[key])
        for key, (metric_type, metric_name) in MODEL_INDEX_METRICS.items() if measured(evaluation.get(key))
    ]


def _model_evaluation(metrics: dict, eval_step: int | None) -> dict | None:
    """The evaluation that measured this folder's weights: the one at `eval_step`, by default the run's best."""
    if eval_step is None:
        return metrics.get("best") or None
    candidates = (metrics.get("eval_history") or []) + [metrics.get("best") or {}]
    return next((entry for entry in candidates if entry.get("step") == eval_step), None)


def _step(entry: dict) -> str:
    epoch = f", epoch {entry['epoch']:g}" if isinstance(entry.get("epoch"), (int, float)) else ""
    return f"step {entry.get('step', '?')}{epoch}"


def _evaluation(metrics: dict, this: dict | None, eval_step: int | None, label2id: dict) -> dict:
    """Template variables of the evaluation section: this model's evaluation, then the run's best and last."""
    best, history = metrics.get("best") or None, metrics.get("eval_history") or []
    entries = [("this model", this)] if this else []
    for name, entry in (("best of the run", best), ("last", history[-1] if history else None)):
        if entry and all(entry.get("step") != other.get("step") for _, other in entries):
            entries.append((name, entry))
    if not entries:
        return {"evaluation": None}
    columns = [f"{name} (step {entry.get('step', '?')})" for name, entry in entries]
    rows = [(label, [percent(entry.get(key)) for _, entry in entries])
            for key, label in TABLE_ROWS.items() if any(key in entry for _, entry in entries)]
    per_class = [(label2id.get(name, "?"), name, percent(value))
                 for name, value in (entries[0][1].get("AP_per_class") or {}).items()]
    per_class.sort(key=lambda row: (not isinstance(row[0], int), row[0] if isinstance(row[0], int) else 0))
    if this is None:
        note = (f"These weights (step {eval_step}) were not evaluated; the columns are the run's evaluations of "
                "other weights, and the metadata holds no model-index.")
    elif best and best.get("step") == this.get("step"):
        note = f"These weights were evaluated at {_step(this)}: the best AP of the run."
    else:
        note = f"These weights were evaluated at {_step(this)}."
    return {"evaluation": rows, "eval_columns": columns, "per_class": per_class, "eval_note": note,
            "per_class_column": columns[0]}


def _final_losses(train_history: list) -> dict:
    if not train_history:
        return {"final_losses": None}
    last = train_history[-1]
    names = sorted((key for key in last if key.startswith("loss") and measured(last[key])), key=lambda k: k != "loss")
    terms = [f"`{key}` {last[key]:.4g}" for key in names]  # the total first
    return {"final_losses": ", ".join(terms) or None, "final_losses_step": last.get("step", "?")}


def render_model_card(output_dir, *, hub_model_id: str | None = None,
                      eval_step: int | None = None) -> ModelCard:
    """Render `output_dir/README.md` from `output_dir/config.json` and `output_dir/metrics.json`; return the card.

    `hub_model_id` ("owner/name") is the repository the folder will be pushed to: the card's code examples load
    it. Without it they load `output_dir` as given. `eval_step` is the step of the evaluation that measured the
    weights in this folder (the model-index reports it); by default `metrics.json["best"]`, i.e. the folder holds
    the best checkpoint. A step that was not evaluated gives a card without model-index.
    """
    output_dir = Path(output_dir)
    config = _read_json(output_dir / "config.json", "the model's config.json")
    metrics = _read_json(output_dir / "metrics.json", "the training run's metrics.json (written by training/train.py)")
    run = metrics.get("run")
    if not isinstance(run, dict):
        raise ValueError(f"{output_dir / 'metrics.json'} has no 'run' object: it is not training/train.py's output.")
    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    label2id = {label: class_id for class_id, label in id2label.items()}
    model_id = hub_model_id or str(output_dir)  # what from_pretrained loads: the repository, else this folder
    folder = output_dir.resolve()
    # train.py saves into OUTPUT_DIR/best and OUTPUT_DIR/last: the run's folder names the model
    title = hub_model_id.split("/")[-1] if hub_model_id else (
        folder.parent.name if folder.name in ("best", "last") else folder.name)
    base_model = hub_id(run.get("model_name_or_path"))
    dataset_name = run.get("dataset") or "an unnamed dataset"
    dataset_id = hub_id(run.get("dataset_id"))   # --dataset_name when it named a Hub dataset, not a local folder
    this = _model_evaluation(metrics, eval_step)
    # the split the evaluations ran on: a `datasets` dataset's is recorded by name; a COCO folder's is its val files
    split = run.get("val_split") or "validation"
    eval_results = _eval_results(this or {}, dataset_id, dataset_name, split)

    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="object-detection", license=run.get("license"),
        tags=[tag for tag in TAGS + (config.get("backbone"),) if tag],
        datasets=[dataset_id] if dataset_id else None, base_model=base_model,
        model_name=title if eval_results else None, eval_results=eval_results or None,
    )
    origin = describe_origin(run, config, base_model)[0]
    kind = "deformable DETR" if config.get("decoder_type") == "deformable" else "DETR"
    head = "sigmoid" if sigmoid_head(config) else "softmax"
    score = f" Validation AP: {percent(this.get('AP'))} (AP50 {percent(this.get('AP50'))})." if this else ""
    pictures = {name: f"{name}.png" if (output_dir / f"{name}.png").is_file() else None
                for name in ("loss_curve", "map_curve", "predictions")}
    val_images = run.get("val_images")
    val_text = f"the {val_images} validation images" if val_images else "the validation images"
    if run.get("val_split"):
        val_text += f" (split `{run['val_split']}`)"
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE_PATH),
        title=title, model_id=model_id, dataset=dataset_name,
        summary=(f"A {kind} object detector with a `{config.get('backbone')}` backbone and a {head} class head, "
                 f"{origin}, on {dataset_name}: {len(id2label)} classes.{score}"),
        architecture=describe_architecture(config, output_dir), classes=sorted(id2label.items()),
        num_classes=len(id2label), num_queries=config.get("num_queries"), class_outputs=class_outputs(config),
        sigmoid=sigmoid_head(config),
        example_label=id2label[min(id2label)] if id2label else "object",
        limitations=_limitations(config, run, this), training_data=describe_training_data(run),
        recipe=describe_recipe(run, config, base_model) + describe_post_processing(output_dir, run),
        files_text=describe_files(output_dir),
        val_images_text=val_text,
        **_final_losses(metrics.get("train_history") or []), **_evaluation(metrics, this, eval_step, label2id),
        **pictures,
    )
    card = ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))  # template blocks leave runs of blank lines
    card.save(output_dir / "README.md")
    return card


def _limitations(config: dict, run: dict, evaluation: dict | None) -> list[str]:
    limit, queries = max_detections(config), config.get("num_queries")
    if sigmoid_head(config):
        head = [f"At most {limit} detections per image: the best (query, class) pairs of {queries} queries x "
                f"{class_outputs(config)} classes; a query may give several classes.",
                "Scores are per-class sigmoid probabilities"
                + (" trained toward the box's IoU" if config["classification_loss"] == "varifocal" else "")
                + "; they were not calibrated."]
    else:
        head = [f"At most {limit} detections per image (one per object query).",
                "Scores are the softmax probability of the predicted class; they were not calibrated."]
    limits = list(head)
    sizes = {name: (evaluation or {}).get(key) for key, name in (("AP_small", "small"), ("AP_medium", "medium"),
                                                                 ("AP_large", "large"))}
    sizes = {name: value for name, value in sizes.items() if measured(value)}
    if len(sizes) > 1:
        limits.append("AP by object size on the validation images: "
                      + ", ".join(f"{name} {percent(value)}" for name, value in sizes.items())
                      + " (COCO areas: small < 32², large > 96² pixels).")
    if isinstance(run.get("train_images"), int) and run["train_images"] < 10000:
        limits.append(f"Trained on {run['train_images']} images only: expect failures on images unlike them.")
    return limits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write OUTPUT_DIR/README.md (model card) from a training run.")
    parser.add_argument("output_dir", help="folder with config.json and metrics.json (training/train.py output)")
    parser.add_argument("--hub-model-id", default=None, help="owner/name the folder is (or will be) pushed to")
    parser.add_argument("--eval-step", type=int, default=None,
                        help="step of the evaluation of the weights in OUTPUT_DIR (default: the run's best)")
    args = parser.parse_args(argv)
    render_model_card(args.output_dir, hub_model_id=args.hub_model_id, eval_step=args.eval_step)
    print(f"wrote {Path(args.output_dir) / 'README.md'}")


if __name__ == "__main__":
    main()
