"""Inference on real faces, for each face detector (faces.DETECTORS: YuNet, MTCNN): detection recall, crop
consistency, and per-frame latency on the CPU.

1. Proof of the crop geometry: real UTKFace crops (../shared/data/utkface200 by default, or --data_dir) are pasted
   into larger scenes (random size 60-250 px, random position, varied backgrounds, 1-4 faces per scene), and the
   full pipeline runs on each scene. Reported: detection recall (a pasted face counts as found when a detected box
   overlaps it with IoU >= 0.4), false detections (boxes that overlap no pasted face so), and the mean
   |age via detect -> align -> crop - age on the original crop| for the same model, overall and by pasted size (the
   original crop resized with the model's own interpolation, as its training cache was; --tta=true averages both
   predictions with the mirrored crops', --tta_views=V over V moved copies). Every detector sees the same scenes
   (the same seed) and aligns with the geometry the model file stores for it (or faces.py's default).
2. Latency of one 640x480 frame with one face, split into detection, crop, model and drawing, for each detector
   with the eager checkpoint, its TorchScript export and its ONNX export (exports are made next to the checkpoint
   if missing), with the same --tta and --tta_views. --detector=<name> limits both parts to one detector.
3. Folder throughput: FOLDER_PHOTOS pasted scenes (960x720 JPEGs, 1-4 real faces each) annotated by
   inference.run_on_images (worker threads decoding and detecting ahead, several photos per model call, writing
   in a thread) against the plain per-photo loop (decode, detect, predict, draw, write, one photo after another),
   with the --detector (default: yunet); the two alternate, FOLDER_REPEATS times each, on the same photos;
   photos/s is the median.

Reads:  --checkpoint (default: the shipped model; a,b,c: their ensemble, inference.AgeEnsemble, without the exports),
        --data_dir (default ../shared/data/utkface200).
Writes: nothing but the exports; prints the tables.

Run:  python -m benchmarks.inference --checkpoint=checkpoints/<run>/best.pt [--data_dir=../shared/data/utkface200]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from config import PREDICTION_FIELDS, Config, parse_config
from faces import DETECTORS, build_detector
from inference import AgePredictor, Face, box_overlap, draw_faces, estimate_faces, load_predictor
from model import choose_model_files

DEFAULT_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface200"
FOLDER_PHOTOS = 200
FOLDER_REPEATS = 3  # alternating runs of each contender; the median counts (this machine's noise: +-20 %)


def make_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One of: a smooth colour gradient, blurred noise, or large blurred blocks (a room-like clutter)."""
    kind = rng.integers(3)
    if kind == 0:
        start, end = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        ramp = np.linspace(0, 1, width)[None, :, None]
        pixels = np.broadcast_to(start + (end - start) * ramp, (height, width, 3))
        return Image.fromarray(pixels.astype(np.uint8))
    if kind == 1:
        noise = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        smooth = Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC)
        return smooth.filter(ImageFilter.GaussianBlur(3))
    blocks = rng.integers(0, 255, (rng.integers(2, 6), rng.integers(2, 8), 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST).filter(ImageFilter.GaussianBlur(2))


def paste_scene(paths: list[Path], rng: np.random.Generator) -> tuple[np.ndarray, list[tuple], list[Path]]:
    """A 960x720 scene with the given faces at random non-overlapping places; returns (RGB, boxes, paths)."""
    width, height = 960, 720
    scene = make_background(rng, width, height)
    boxes = []
    for path in paths:
        for _ in range(50):
            size = int(rng.integers(60, 251))
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            if all(box_overlap((x, y, size, size), other) == 0 for other in boxes):
                break
        else:
            continue
        scene.paste(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC), (x, y))
        boxes.append((x, y, size, size))
    return np.asarray(scene), boxes, paths[: len(boxes)]


SIZE_BANDS = ((60, 100), (100, 150), (150, 251))  # pasted face sizes (px), for |age difference| by size


def detection_proof(predictor: AgePredictor, face_paths: list[Path], scenes: int, seed: int,
                    detector_name: str = "mtcnn", tta: bool = False) -> dict[str, Any]:
    from custom_dataset_dataloader import load_image

    detector, rng = build_detector(detector_name), np.random.default_rng(seed)
    found = total = false_detections = 0
    differences, sizes = [], []
    for _ in range(scenes):
        chosen = [face_paths[index] for index in rng.choice(len(face_paths), int(rng.integers(1, 5)), replace=False)]
        scene, boxes, placed = paste_scene(chosen, rng)
        faces = estimate_faces(scene, predictor, detector, tta)
        # the original crops resized as the training cache resized them (the model's own interpolation)
        originals = [load_image(path, predictor.image_size, predictor.cfg.interpolation) for path in placed]
        direct = predictor.predict(np.stack(originals), tta)
        overlaps = np.array([[box_overlap(box, face.box) for face in faces] for box in boxes]).reshape(
            len(boxes), len(faces))  # (pasted, detected) IoU
        false_detections += int((overlaps.max(0, initial=0.0) < 0.4).sum())
        for row, direct_age, box in zip(overlaps, direct, boxes, strict=True):
            total += 1
            if row.max(initial=0.0) >= 0.4:
                found += 1
                differences.append(abs(faces[int(row.argmax())].age - float(direct_age)))
                sizes.append(box[2])
    differences, sizes = np.array(differences), np.array(sizes)
    by_size = {f"{low}-{high - 1} px": float(differences[(sizes >= low) & (sizes < high)].mean())
               for low, high in SIZE_BANDS if ((sizes >= low) & (sizes < high)).any()}
    return {"faces": total, "recall": found / max(total, 1), "false_detections": false_detections,
            "mean_abs_age_difference": float(differences.mean()),
            # the mean's standard error over these faces: how far another draw of scenes could move it
            "standard_error": float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1
            else float("nan"),
            "median_abs_age_difference": float(np.median(differences)), "mean_by_size": by_size}


def latency(predictor: AgePredictor, frame: np.ndarray, min_face_size: int, detector_name: str = "mtcnn",
            repeats: int = 30, tta: bool = False) -> dict[str, float]:
    """Median milliseconds of each stage on one frame (with the predictor's views and, with tta, the flip)."""
    detector = build_detector(detector_name, min_face_size)
    geometry = predictor.geometry_for(detector_name)
    timings: dict[str, list[float]] = {"detect": [], "crop": [], "model": [], "draw": [], "total": []}
    for _ in range(repeats + 3):
        started = time.perf_counter()
        faces = detector.detect_faces(frame)[:1]  # the frame holds one face that every setting here finds
        detected = time.perf_counter()
        crops = np.stack([geometry.crop(frame, face.landmarks, predictor.image_size, predictor.cfg.interpolation)
                          for face in faces])
        cropped = time.perf_counter()
        ages = predictor.predict(crops, tta)
        predicted = time.perf_counter()
        draw_faces(frame, [Face(face.box, float(age), landmarks=face.landmarks)
                           for face, age in zip(faces, ages, strict=True)])
        drawn = time.perf_counter()
        for name, value in (("detect", detected - started), ("crop", cropped - detected),
                            ("model", predicted - cropped), ("draw", drawn - predicted), ("total", drawn - started)):
            timings[name].append(value * 1000)
    return {name: float(np.median(values[3:])) for name, values in timings.items()}


def folder_throughput(predictor: AgePredictor, face_paths: list[Path], min_face_size: int, seed: int,
                      detector_name: str = "yunet", photos: int = FOLDER_PHOTOS) -> dict[str, float]:
    """Photos/s of inference.run_on_images against one-photo-at-a-time on `photos` generated scenes."""
    import statistics
    import tempfile

    import inference
    from custom_dataset_dataloader import open_rgb_image

    rng = np.random.default_rng(seed)
    detector = build_detector(predictor.detector_name(detector_name), min_face_size)
    cfg = Config(min_face_size=min_face_size)
    with tempfile.TemporaryDirectory(prefix="folder_benchmark_") as temporary:
        folder = Path(temporary)
        paths = []
        for index in range(photos):
            picks = [face_paths[i] for i in rng.choice(len(face_paths), int(rng.integers(1, 5)), replace=False)]
            path = folder / "photos" / f"scene_{index:03d}.jpg"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(paste_scene(picks, rng)[0]).save(path, quality=90)
            paths.append(path)

        def one_at_a_time(output: Path) -> None:
            rows = []
            for path in paths:
                image = np.asarray(open_rgb_image(path))
                faces = estimate_faces(image, predictor, detector)
                inference.write_image(output / f"{path.stem}_age.jpg", draw_faces(image, faces))
                rows += inference.face_rows(str(path), None, faces)
            inference.write_rows(output / "predictions.jsonl", rows)

        def pipelined(output: Path) -> None:
            targets = inference.folder_targets(paths, output)
            inference.run_on_images(cfg, paths, targets, output / "predictions.jsonl", predictor, detector)

        rates: dict[str, list[float]] = {"one photo at a time": [], "run_on_images": []}
        for repeat in range(FOLDER_REPEATS):
            for name, runner in (("one photo at a time", one_at_a_time), ("run_on_images", pipelined)):
                output = folder / f"{name.replace(' ', '_')}_{repeat}"
                output.mkdir()
                started = time.perf_counter()
                runner(output)
                rates[name].append(photos / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


SETTINGS = (*PREDICTION_FIELDS, "data_dir", "seed")  # what this script reads (its --help)


def main(cfg: Config) -> dict:
    import export_jit

    files = choose_model_files(cfg)
    checkpoint = files[0]
    data_dir = Path(cfg.data_dir) if "data_dir" in cfg.given_keys else DEFAULT_FACES
    face_paths = sorted(data_dir.glob("*.jpg"))
    if not face_paths:
        raise SystemExit(f"error: no face images in {data_dir}; pass --data_dir=<folder of UTKFace crops>")
    detectors = [cfg.detector] if "detector" in cfg.given_keys else list(DETECTORS)
    # several files: their ensemble (inference.AgeEnsemble) is measured as inference.py runs it; exports are per model
    predictor = load_predictor(files, views=cfg.tta_views)
    results: dict = {"proof": {}, "latency": {}}
    print(f"\ncrop proof on real faces pasted into 100 scenes ({data_dir}):")
    for name in detectors:
        stored = "stored" if name in predictor.crop_geometries else "faces.py's default"
        proof = results["proof"][name] = detection_proof(predictor, face_paths, scenes=100, seed=cfg.seed,
                                                         detector_name=name, tta=cfg.tta)
        print(f"  {name:<6} ({stored} crop geometry{', flip TTA' if cfg.tta else ''}"
              f"{f', {cfg.tta_views} views' if cfg.tta_views > 1 else ''}): {proof['faces']} faces, "
              f"recall {proof['recall']:.1%}, {proof['false_detections']} false detections; |age via "
              f"detect->align->crop - age on the original crop|: mean {proof['mean_abs_age_difference']:.2f} y "
              f"(standard error {proof['standard_error']:.2f}), "
              f"median {proof['median_abs_age_difference']:.2f} y; mean by pasted size: " + ", ".join(
                  f"{band} {value:.2f} y" for band, value in proof["mean_by_size"].items()))

    frame = np.asarray(make_background(np.random.default_rng(1), 640, 480)).copy()  # (480, 640, 3)
    face = Image.open(face_paths[len(face_paths) // 2]).convert("RGB").resize((160, 160), Image.Resampling.BICUBIC)
    frame[160:320, 240:400] = np.asarray(face)  # one 160 px face in the middle
    print(f"\nlatency of one 640x480 frame with one face ({predictor.cfg.model_name} at {predictor.image_size}px, "
          f"min_face_size={cfg.min_face_size}, tta_views={cfg.tta_views}, tta={cfg.tta}, median ms):")
    print(f"  {'model file':<12} {'detector':<8} {'detect':>7} {'crop':>6} {'model':>7} {'draw':>6} {'total':>7} "
          f"{'FPS':>6}")
    for export_format in ("checkpoint", "torchscript", "onnx") if len(files) == 1 else ("ensemble",):
        path = checkpoint
        if export_format not in ("checkpoint", "ensemble"):
            path = checkpoint.with_name(f"model.{export_format}")
            if not path.is_file():
                export_jit.main(replace(cfg, checkpoint=str(checkpoint), format=export_format, output=str(path)))
        # the proof's settings: its views and flip
        exported = predictor if export_format == "ensemble" else AgePredictor(path, views=cfg.tta_views)
        for name in detectors:
            timing = results["latency"][f"{export_format}/{name}"] = latency(exported, frame, cfg.min_face_size, name,
                                                                             tta=cfg.tta)
            print(f"  {export_format:<12} {name:<8} {timing['detect']:7.1f} {timing['crop']:6.1f} "
                  f"{timing['model']:7.1f} {timing['draw']:6.1f} {timing['total']:7.1f} {1000 / timing['total']:6.1f}")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # run_on_images prints a line per photo
        folder = folder_throughput(predictor, face_paths, cfg.min_face_size, cfg.seed, cfg.detector)
    results["folder"] = folder
    baseline = folder["one photo at a time"]
    print(f"\nfolder of {FOLDER_PHOTOS} photos (960x720, 1-4 faces each; {cfg.detector}), photos/s "
          f"(median of {FOLDER_REPEATS}):")
    for name, rate in folder.items():
        print(f"  {name:<20} {rate:6.1f}  ({rate / baseline:.2f}x)")
    return results


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
