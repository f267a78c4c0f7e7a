"""detr-custom-predict: a detector on images, folders, globs and videos -> COCO results and annotated pictures.

    detr-custom-predict outputs/demo/best data/demo/val2017 --output predictions/
    detr-custom-predict MODEL photo.jpg "shots/*.png" clip.mp4 --output DIR [--threshold 0.5] [--batch_size 4]
    detr-custom-predict MODEL images/ --output DIR --annotation_file instances_val2017.json --threshold 0

Writes into DIR:
- predictions.json: COCO results (`image_id`, `category_id`, `bbox` [x, y, width, height] in pixels, `score`), one
  entry per detection above --threshold. With --annotation_file, image ids are that file's (matched by file name)
  and category ids its categories' (matched by class name), so pycocotools scores the file against it directly;
  otherwise images are numbered 1, 2, ... in input order and category ids are the model's labels.
- images.json: the COCO `images` (id, file_name, width, height; a video frame also has `video` and `frame_index`)
  and `categories` these ids refer to.
- one annotated picture per image (DIR/<name>.jpg) and one annotated video per video (DIR/<name>.mp4).
A file that cannot be read is reported and skipped; the summary counts images, detections and ms per image
(forward and post-processing). Images are read upright (their EXIF orientation applied), as the processor does.
"""
import argparse
import glob
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
from tqdm.auto import tqdm

from .drawing import draw_detections
from .runtimes import Detector, add_nms_argument, load_detector

logger = logging.getLogger("deploy.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images and videos, sorted, not recursive) and globs -> the files, in order, once each."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ValueError(f"{item}: no such file or folder, and no file matches it as a pattern.")
            files += [Path(m) for m in matches if Path(m).is_file()]
    unique = list(dict.fromkeys(files))
    if not unique:
        raise ValueError(f"No image or video found in {inputs} (images: {', '.join(IMAGE_SUFFIXES)}; videos: "
                         f"{', '.join(VIDEO_SUFFIXES)}).")
    return unique


@dataclass
class CocoIds:
    """Image and category ids of the output: from an annotation file (by file name and class name), or new."""

    image_ids: dict[str, int] = field(default_factory=dict)      # file name -> the annotation file's image id
    label_to_category_id: dict[int, int] = field(default_factory=dict)
    categories: list[dict] = field(default_factory=list)
    next_id: int = 1
    warned: bool = False                                           # about images the annotation file lacks

    @classmethod
    def from_annotation_file(cls, path: str | None, id2label: dict) -> "CocoIds":
        if path is None:
            return cls(label_to_category_id={int(k): int(k) for k in id2label},
                       categories=[{"id": int(k), "name": name} for k, name in sorted(id2label.items())])
        try:
            coco = json.loads(Path(path).read_text())
            images, categories = coco["images"], coco["categories"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--annotation_file {path}: not a readable COCO json with 'images' and 'categories' "
                             f"({type(error).__name__}: {error}).") from error
        by_name = {str(c["name"]): int(c["id"]) for c in categories}
        mapping = {int(label): by_name[name] for label, name in id2label.items() if name in by_name}
        if not mapping:
            raise ValueError(f"--annotation_file {path}: none of its categories {sorted(by_name)} is a class of the "
                             f"model ({sorted(id2label.values())}); category ids are matched by class name.")
        missing = sorted(name for name in id2label.values() if name not in by_name)
        if missing:
            logger.warning("classes %s of the model are not categories of %s: their detections are left out",
                           missing, path)
        image_ids = {Path(image["file_name"]).name: int(image["id"]) for image in images}
        return cls(image_ids=image_ids, label_to_category_id=mapping, categories=categories,
                   next_id=max(image_ids.values(), default=0) + 1)

    def image_id(self, name: str) -> int:
        if name in self.image_ids:
            return self.image_ids[name]
        if self.image_ids and not self.warned:
            self.warned = True
            logger.warning("%s is not an image of the annotation file: it gets a new image id (%d), as every "
                           "other image it lacks", name, self.next_id)
        self.next_id += 1
        return self.next_id - 1


class Predictor:
    """Runs the detector over the inputs, batch by batch, and collects COCO results, images and counts."""

    def __init__(self, detector: Detector, output: Path, *, threshold: float, batch_size: int, ids: CocoIds,
                 progress: bool):
        self.detector, self.output, self.threshold, self.batch_size, self.ids = (
            detector, output, threshold, batch_size, ids)
        self.progress = progress
        self.results, self.images, self.skipped = [], [], []
        self.seconds, self.pictures, self.videos = 0.0, [], []
        self._names: set[str] = set()

    def _output_name(self, path: Path, suffix: str) -> Path:
        """DIR/<stem><suffix>, numbered when two inputs share a stem."""
        name, n = f"{path.stem}{suffix}", 1
        while name in self._names:
            name, n = f"{path.stem}_{n}{suffix}", n + 1
        self._names.add(name)
        return self.output / name

    def _record(self, image_id: int, detection: dict) -> None:
        rows = zip(detection["scores"].tolist(), detection["labels"].tolist(), detection["boxes"].tolist())
        for score, label, (x0, y0, x1, y1) in rows:
            if label in self.ids.label_to_category_id:
                self.results.append({"image_id": image_id, "category_id": self.ids.label_to_category_id[label],
                                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})

    def _detect(self, images: list[PIL.Image.Image]) -> list[dict]:
        detections, seconds = self.detector.detect(images, self.threshold)
        self.seconds += seconds
        return detections

    def images_batch(self, paths: list[Path], bar) -> None:
        opened = []
        for path in paths:
            try:
                with PIL.Image.open(path) as image:
                    opened.append((path, PIL.ImageOps.exif_transpose(image).convert("RGB")))
            except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
                self.skip(path, error)
        if opened:
            for (path, image), detection in zip(opened, self._detect([image for _, image in opened])):
                image_id = self.ids.image_id(path.name)
                self.images.append({"id": image_id, "file_name": path.name, "width": image.width,
                                    "height": image.height})
                self._record(image_id, detection)
                picture = self._output_name(path, ".jpg")
                draw_detections(image, detection, self.detector.id2label).save(picture, quality=92)
                self.pictures.append(picture)
        bar.update(len(paths))

    def video(self, path: Path, bar) -> None:
        import av   # the `video` extra

        try:
            container = av.open(str(path))
            stream = container.streams.video[0]
        except (av.FFmpegError, IndexError, OSError) as error:
            self.skip(path, error)
            return
        writer, frames, index = None, [], 0
        target = self._output_name(path, ".mp4")
        try:
            with container:
                rate = stream.average_rate or 25
                for frame in container.decode(stream):
                    frames.append(frame.to_image())
                    if len(frames) == self.batch_size:
                        writer = self._video_frames(path, frames, index, writer, target, rate)
                        index, frames = index + len(frames), []
                if frames:
                    writer = self._video_frames(path, frames, index, writer, target, rate)
                    index += len(frames)
        except av.FFmpegError as error:   # a damaged stream: what was decoded stays written
            self.skip(path, error, after_frames=index)
        finally:
            if writer is not None:
                out_container, out_stream = writer
                for packet in out_stream.encode():
                    out_container.mux(packet)
                out_container.close()
                self.videos.append(target)
        bar.update(1)

    def _video_frames(self, path, frames, first_index, writer, target, rate):
        import av

        for offset, (frame, detection) in enumerate(zip(frames, self._detect(frames))):
            index = first_index + offset
            image_id = self.ids.image_id(f"{path.name}#frame={index}")
            self.images.append({"id": image_id, "file_name": f"{path.name}#frame={index}", "width": frame.width,
                                "height": frame.height, "video": path.name, "frame_index": index})
            self._record(image_id, detection)
            picture = draw_detections(frame, detection, self.detector.id2label)
            if writer is None:
                out_container = av.open(str(target), "w")
                codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                out_stream = out_container.add_stream(codec, rate=rate)
                out_stream.width, out_stream.height = frame.width - frame.width % 2, frame.height - frame.height % 2
                out_stream.pix_fmt = "yuv420p"   # even sizes: an odd last row / column is left out of the video
                writer = (out_container, out_stream)
            out_container, out_stream = writer
            pixels = np.asarray(picture)[:out_stream.height, :out_stream.width]
            for packet in out_stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")):
                out_container.mux(packet)
        return writer

    def skip(self, path: Path, error: Exception, after_frames: int | None = None) -> None:
        where = f" after {after_frames} frames" if after_frames else ""
        message = f"{path}: skipped{where}, it cannot be read ({type(error).__name__}: {error})"
        self.skipped.append(message)
        logger.warning("%s", message)

    def run(self, files: list[Path]) -> None:
        with tqdm(total=len(files), desc="predict", unit="file", disable=not self.progress) as bar:
            pending = []
            for path in files:
                if path.suffix.lower() in VIDEO_SUFFIXES:
                    self.video(path, bar)
                    continue
                pending.append(path)
                if len(pending) == self.batch_size:
                    self.images_batch(pending, bar)
                    pending = []
            if pending:
                self.images_batch(pending, bar)

    def summary(self) -> dict:
        images = len(self.images)
        return {"images": images, "detections": len(self.results), "skipped": self.skipped,
                "ms_per_image": 1000 * self.seconds / images if images else None,
                "predictions": str(self.output / "predictions.json"), "pictures": len(self.pictures),
                "videos": [str(v) for v in self.videos]}


def predict(model: str, inputs: list[str], output: str, *, threshold: float = 0.5, batch_size: int = 1,
            annotation_file: str | None = None, progress: bool = True,
            nms_iou_threshold: float | None = None) -> dict:
    """The Python function behind detr-custom-predict; returns the summary (see the module docstring)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"--threshold is a score in [0, 1], got {threshold}.")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}.")
    files = expand_inputs(inputs)
    detector = load_detector(model, nms_iou_threshold=nms_iou_threshold)
    ids = CocoIds.from_annotation_file(annotation_file, detector.id2label)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(detector, output, threshold=threshold, batch_size=batch_size, ids=ids, progress=progress)
    predictor.run(files)
    (output / "predictions.json").write_text(json.dumps(predictor.results))
    (output / "images.json").write_text(json.dumps({"images": predictor.images, "categories": ids.categories},
                                                   indent=1))
    return predictor.summary()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="detr-custom-predict", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a saved folder (best/, last/), a transformers DETR / RT-DETR folder or Hub "
                                      "id, or an exported .onnx / .xml file")
    parser.add_argument("inputs", nargs="+", help="image files, folders, glob patterns (quoted), videos")
    parser.add_argument("--output", required=True, help="folder for predictions.json, images.json and pictures")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring above this")
    parser.add_argument("--annotation_file", help="a COCO json: take its image ids (by file name) and category ids "
                                                  "(by class name)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward (video frames too)")
    add_nms_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        summary = predict(args.model, args.inputs, args.output, threshold=args.threshold,
                          batch_size=args.batch_size, annotation_file=args.annotation_file,
                          progress=sys.stderr.isatty(), nms_iou_threshold=args.nms_iou_threshold)
    except ValueError as error:
        print(f"detr-custom-predict: {error}", file=sys.stderr)
        return 2
    ms = "-" if summary["ms_per_image"] is None else f"{summary['ms_per_image']:.1f}"
    print(f"{summary['images']} images, {summary['detections']} detections, {ms} ms per image (forward + "
          f"post-processing); {len(summary['skipped'])} files skipped")
    for message in summary["skipped"]:
        print(f"  {message}")
    print(f"written: {summary['predictions']}, {summary['pictures']} pictures"
          + (f", videos {', '.join(summary['videos'])}" if summary["videos"] else "") + f" in {args.output}")
    return 0 if summary["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
