"""The real-data benchmark end to end on a tiny subset: the stardist tiles are built from the installed package, one
of our presets trains through the training script and a torchvision detector here, both evaluated by pycocotools on
the held-out and the training split."""
import json

import numpy as np
import pytest

from benchmarks import bench_real, real_data


def test_real_data_is_a_coco_folder_of_disjoint_regions(tmp_path):
    folder = real_data.build(tmp_path / "nuclei")
    splits = {split: json.loads((folder / "annotations" / f"instances_{split}2017.json").read_text())
              for split in ("train", "val")}
    assert len(splits["train"]["images"]) == 35 and len(splits["val"]["images"]) == 4
    assert len(splits["train"]["annotations"]) > 250 and len(splits["val"]["annotations"]) > 30
    for split, coco in splits.items():
        for image in coco["images"]:
            assert (folder / f"{split}2017" / image["file_name"]).is_file()
        for annotation in coco["annotations"]:
            x, y, w, h = annotation["bbox"]
            image = coco["images"][annotation["image_id"] - 1]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
    train_right = max(int(i["file_name"].split("_x")[1].split("_")[0]) + i["width"] for i in splits["train"]["images"])
    val_left = min(int(i["file_name"].split("_x")[1].split("_")[0]) for i in splits["val"]["images"])
    assert train_right < val_left   # the held-out tiles come from another region of the image


@pytest.mark.parametrize("fold", sorted(real_data.FOLDS))
def test_no_nucleus_is_labelled_in_both_splits_of_a_fold(fold):
    """Each source nucleus's box, traced back from every labelled tile box, lands in one split only."""
    _, labels = real_data.load_source()
    boxes = real_data.instance_boxes(labels)
    labelled = {}
    for split, tiles in real_data.tile_grid(fold).items():
        for left, top, width, height in tiles:
            clipped = np.clip(boxes - [left, top, left, top], 0, [width, height, width, height])
            for box in real_data.tile_annotations(boxes, left, top, width, height):
                # the nucleus whose clipped box this is
                match = np.flatnonzero(np.abs(clipped - [box[0], box[1], box[0] + box[2], box[1] + box[3]]).sum(1)
                                       < 1e-3)
                labelled.setdefault(split, set()).update(match.tolist())
    assert labelled["train"] and labelled["val"] and not labelled["train"] & labelled["val"]


def test_the_two_folds_hold_out_different_nuclei(tmp_path):
    held_out = {}
    for fold in ("right", "left"):
        folder = real_data.build(tmp_path / fold, fold=fold)
        coco = json.loads((folder / "annotations" / "instances_val2017.json").read_text())
        held_out[fold] = {(i["file_name"].split("_x")[1], i["width"]) for i in coco["images"]}
        assert len(coco["images"]) == 4 and len(coco["annotations"]) > 30
    (right_columns,) = {(int(c.split("_")[0]), w) for c, w in held_out["right"]}
    (left_columns,) = {(int(c.split("_")[0]), w) for c, w in held_out["left"]}
    assert left_columns[0] + left_columns[1] <= right_columns[0]   # the held-out strips do not overlap
    assert real_data.fold_dir("left").name == "stardist_nuclei_left"
    with pytest.raises(ValueError, match="unknown fold 'middle'"):
        real_data.build(tmp_path / "x", fold="middle")


def test_bench_real_runs_end_to_end_on_a_tiny_subset(tmp_path):
    data = real_data.build(tmp_path / "nuclei")
    result = bench_real.main(["--data-dir", str(data), "--detectors", "detr-demo,fasterrcnn", "--steps", "2",
                              "--batch-size", "2", "--scales", "64", "--eval-size", "64", "--max-size", "96",
                              "--max-train-images", "3", "--max-val-images", "2",
                              "--output-dir", str(tmp_path / "out")])
    rows = {row["detector"]: row for row in result["rows"]}
    assert set(rows) == {"detr-demo", "fasterrcnn"}
    for row in rows.values():
        assert set(row) == set(bench_real.COLUMNS)
        assert row["steps"] == 2 and row["train s"] > 0 and row["s/step"] > 0
        for key in ("AP", "AP50", "AR@100", "train AP50"):
            assert 0.0 <= row[key] <= 1.0
        assert row["gap"] == pytest.approx(row["train AP50"] - row["AP50"])
    (equal,) = result["equal_time"]
    assert equal["detector"] == "detr-demo" and equal["against"] == "fasterrcnn"
    text = (tmp_path / "out" / "bench_real.md").read_text()
    assert "| detr-demo | 2 |" in text and "| fasterrcnn | 2 |" in text and "Command:" in text
    assert (tmp_path / "out" / "detr-demo" / "run" / "metrics.json").is_file()   # trained by the training script


def test_a_lever_overrides_the_benchmark_sizes_and_several_runs_give_their_mean(tmp_path):
    from benchmarks import bench_real_levers

    data = real_data.build(tmp_path / "nuclei")
    files = bench_real.subset(data, tmp_path / "subset", None, None)
    settings = {**bench_real_levers.SETTINGS, "steps": 300, "seed": 42}
    config = bench_real.detr_config("detr-small", files, tmp_path / "run", **settings,
                                    extra=bench_real_levers.LEVERS["upscale x2"])
    assert config["train_scales"] == [224, 256, 288] and config["eval_size"] == 256 and config["max_size"] == 448
    assert config["vertical_flip"] and config["two_stage"]   # the preset's own fields stay
    assert config["learning_rate"] == pytest.approx(1e-3)   # finetune_small.yaml's
    slower = bench_real.detr_config("detr-small", files, tmp_path / "run", **settings,
                                    extra=bench_real_levers.LEVERS["upscale x2+lr 5e-4"])
    assert slower["learning_rate"] == pytest.approx(5e-4) and slower["eval_size"] == 256
    plain = bench_real.detr_config("detr-small", files, tmp_path / "run", **settings)
    assert plain["train_scales"] == [112, 128, 144] and plain["eval_size"] == 128
    doubled = bench_real.detr_config("detr-small-x2", files, tmp_path / "run", **settings)
    assert doubled["train_scales"] == [224, 256, 288] and doubled["eval_size"] == 256 and doubled["max_steps"] == 300
    runs = [{"AP": 0.3, "AP50": 0.8, "train AP50": 0.9, "gap": 0.1, "s/step": 1.0},
            {"AP": 0.4, "AP50": 0.9, "train AP50": 0.9, "gap": 0.0, "s/step": 2.0}]
    row = bench_real_levers.summarize("x", runs)
    assert row["AP50"] == pytest.approx(0.85) and row["gap"] == pytest.approx(0.05) and row["s/step"] == 1.5
    assert row["AP50 by run"] == "0.800 / 0.900 (± 0.050)"
    assert "| x | 0.350 | 0.850 | 0.800 / 0.900 (± 0.050) | 0.900 | +0.050 | 1.50 |" in \
        bench_real_levers.format_table([row])


def test_detr_detections_score_each_image_on_its_own_pixels(tmp_path):
    """Images of different sizes in one chunk: the benchmark's detections are each image's alone (what the training
    loop's evaluation and detr-custom-eval give), not those of the padded batch."""
    from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
    from modeling_detr_custom.testing_utils import randomize_, tiny_kwargs

    config = DetrCustomConfig(**tiny_kwargs(num_labels=1, id2label={0: "nucleus"}, label2id={"nucleus": 0}))
    randomize_(DetrCustomForObjectDetection(config)).eval().save_pretrained(tmp_path)
    DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(tmp_path)
    generator = np.random.default_rng(0)
    examples = [(index, generator.integers(0, 256, size, dtype=np.uint8), None, None)
                for index, size in enumerate([(64, 96, 3), (80, 64, 3), (64, 64, 3)], start=1)]
    together = bench_real.detr_detections(tmp_path, examples, {1: "nucleus"}, batch_size=3)
    alone = [d for example in examples for d in bench_real.detr_detections(tmp_path, [example], {1: "nucleus"})]
    assert len(together) == len(alone) > 0
    for got, want in zip(together, alone):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3)
