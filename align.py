"""Align every face of a data set to one template, the template inference.py, the app and the exports use.

Reads:  <csv_dir>/{train,valid,test}_set.csv (split_dataset.py) and the photos under data_dir.
Writes: <aligned_dir>/<source>/<image name>.jpg, one aligned face per photo (aligned_size px, JPEG quality 95);
        <aligned_dir>/alignment.json (the template, size and detector: train.py stores it as the model's crop
        geometry, so a user's photo is aligned exactly as the training faces were);
        <aligned_csv_dir>/{train,valid,test}_set.csv (default <csv_dir>/aligned/): the same rows and labels, image
        names relative to aligned_dir, a `source` column; alignment_report.csv: every photo with no face or several.

Each photo is padded with black by half its side (tight crops such as UTKFace's chips would otherwise cut the face
at the border, where the detector misses it), the detector (YuNet by default) finds its faces, and the face nearest
the photo's centre among the large ones is warped onto the template by its five landmarks (faces.CropGeometry).
Photos without a face are left out and counted. --align_method=chip skips detection for sets of tight crops framed
like UTKFace's chips: every photo is mapped by UTKFace's median landmark layout (RESULTS.md measures both).
Faces already aligned by an earlier run with the same template are kept (a rerun resumes).

Run:  python align.py --data_dir=../data/fairface --csv_dir=csv_dataset/fairface --aligned_dir=../data/aligned
      python split_dataset.py --combine=csv_dataset/utk/aligned,csv_dataset/fairface/aligned --csv_dir=csv_dataset/mix
      python train.py --data_dir=../data/aligned --csv_dir=csv_dataset/mix
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from config import Config, UsageError, parse_config, print_config
from custom_dataset_dataloader import SPLITS, DataError, read_dataset_csv, screen_rows, split_csv_path
from faces import ALIGNMENT_TEMPLATES, DEFAULT_CROP_GEOMETRIES, CropGeometry
from files import atomic_write_path, write_csv

MARKER = "alignment.json"  # in aligned_dir: written by this script, so it only ever writes into its own folder
PADDING = 0.5  # black border added on each side, as a share of the photo's longer side, before detection
JPEG_QUALITY = 95


@dataclass(frozen=True)
class AlignedFace:
    """What aligning one photo gave: how many faces the detector found, and whether a face was written."""

    faces_found: int
    written: bool
    reason: str = ""


def choose_face(faces: list, width: int, height: int, offset: float) -> int:
    """Index of the face a labelled photo is about: among the faces at least half as wide as the largest, the one
    whose centre is nearest the photo's centre (FairFace's photos show bystanders; its subject is centred)."""
    widths = np.array([face.box[2] for face in faces])
    centres = np.array([[face.box[0] + face.box[2] / 2, face.box[1] + face.box[3] / 2] for face in faces]) - offset
    distance = np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2)
    distance[widths < widths.max() / 2] = np.inf
    return int(np.argmin(distance))


class Aligner:
    """Aligns photos to `template` at `size` px; one per worker process (each has its own detector)."""

    def __init__(self, template: CropGeometry, size: int, method: str, detector: str, interpolation: str):
        self.template, self.size, self.method, self.interpolation = template, size, method, interpolation
        self.detector = None
        if method == "detect":
            from faces import build_detector

            self.detector = build_detector(detector)

    def __call__(self, source: str, destination: str) -> AlignedFace:
        import cv2

        from custom_dataset_dataloader import open_rgb_image

        try:
            image = np.asarray(open_rgb_image(source))  # (H, W, 3) uint8
        except Exception as error:  # noqa: BLE001 - one unreadable photo is counted, never the end of the run
            return AlignedFace(0, False, f"unreadable ({type(error).__name__})")
        height, width = image.shape[:2]
        if self.method == "chip":  # a UTKFace-like chip: its landmarks sit where UTKFace's median chip has them
            landmarks, found = np.asarray(DEFAULT_CROP_GEOMETRIES["yunet"].landmarks) * [width, height], 1
        else:
            pad = int(max(height, width) * PADDING)
            padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            # the labelled face fills a good part of the photo: smaller ones are bystanders or false detections
            faces = self.detector.detect_faces(padded, min_face_size=max(16, min(height, width) // 6))
            if not faces:
                return AlignedFace(0, False, "no face found")
            found = len(faces)
            landmarks = faces[choose_face(faces, width, height, pad)].landmarks - pad
        face = self.template.crop(image, landmarks, self.size, self.interpolation)  # (3, S, S) uint8
        encoded = cv2.imencode(".jpg", np.ascontiguousarray(face.transpose(1, 2, 0)[:, :, ::-1]),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
        with atomic_write_path(destination) as temporary:
            temporary.write_bytes(encoded.tobytes())
        return AlignedFace(found, True)


_worker: Aligner | None = None


def _start_worker(*arguments) -> None:
    import cv2

    global _worker
    cv2.setNumThreads(1)  # one core per worker process
    _worker = Aligner(*arguments)


def _align_one(job: tuple[str, str]) -> AlignedFace:
    return _worker(*job)


def claim_aligned_dir(cfg: Config, template: CropGeometry) -> dict:
    """The marker of aligned_dir, created on first use. A folder that holds files but no marker is not ours, and a
    marker for another template or size would mix two alignments in one folder: both stop here, before any work."""
    root = Path(cfg.aligned_dir)
    marker = root / MARKER
    wanted = {"template": cfg.alignment_template, "landmarks": template.to_dict()["landmarks"],
              "size": cfg.aligned_size, "detector": cfg.detector}
    if marker.is_file():
        stored = json.loads(marker.read_text())
        differing = [key for key, value in wanted.items() if stored.get(key) != value and key != "detector"]
        if differing:
            raise UsageError(f"{root} holds faces aligned with another {', '.join(differing)} ({marker}); pass "
                             "another --aligned_dir for this alignment")
        return stored
    if root.is_dir() and any(root.iterdir()):
        raise UsageError(f"{root} is not empty and was not written by align.py (no {MARKER}); pass a new "
                         "--aligned_dir")
    with atomic_write_path(marker) as temporary:
        temporary.write_text(json.dumps(wanted, indent=1) + "\n")
    return wanted


def aligned_name(source: str, image_name: str) -> str:
    """Where a photo's aligned face goes, relative to aligned_dir: <source>/<its path, suffix .jpg>."""
    return f"{source}/{Path(image_name).with_suffix('.jpg').as_posix()}"


def align_rows(cfg: Config, frame: pd.DataFrame, source: str, template: CropGeometry) -> list[AlignedFace]:
    """Align every row of `frame` (files already screened) in cfg.num_workers processes; faces written by an
    earlier run with this template are kept as they are."""
    from multiprocessing import get_context

    from tqdm import tqdm

    jobs, results, todo = [], [None] * len(frame), []
    for position, image_name in enumerate(frame["image_name"]):
        destination = Path(cfg.aligned_dir) / aligned_name(source, image_name)
        if destination.is_file():
            results[position] = AlignedFace(-1, True, "kept from an earlier run")
        else:
            jobs.append((str(Path(cfg.data_dir) / image_name), str(destination)))
            todo.append(position)
    arguments = (template, cfg.aligned_size, cfg.align_method, cfg.detector, cfg.interpolation or "bilinear")
    with tqdm(total=len(jobs), desc=f"aligning {source}", leave=False, disable=None) as progress:
        if cfg.num_workers > 0 and len(jobs) > 64:
            with get_context("spawn").Pool(cfg.num_workers, _start_worker, arguments) as pool:
                for position, result in zip(todo, pool.imap(_align_one, jobs, chunksize=32), strict=True):
                    results[position] = result
                    progress.update()
        else:
            aligner = Aligner(*arguments)
            for position, job in zip(todo, jobs, strict=True):
                results[position] = aligner(*job)
                progress.update()
    return results


SETTINGS = ("data_dir", "csv_dir", "aligned_dir", "aligned_csv_dir", "source_name", "alignment_template",
            "align_method", "aligned_size", "detector", "interpolation", "num_workers", "max_age")  # its --help


def main(cfg: Config) -> dict[str, int]:
    """Align every photo of the three splits; write the aligned split CSVs and the report; return the counts."""
    print_config(cfg, "align.py", SETTINGS)
    template = ALIGNMENT_TEMPLATES[cfg.alignment_template]
    source = cfg.source_name or Path(cfg.csv_dir).resolve().name
    output_dir = Path(cfg.aligned_csv_dir or Path(cfg.csv_dir) / "aligned")
    if Path(cfg.aligned_dir).resolve() == Path(cfg.data_dir).resolve():
        raise UsageError("--aligned_dir must be a folder of its own, not the data folder the photos are in")
    claim_aligned_dir(cfg, template)
    counts = {"photos": 0, "aligned": 0, "no_face": 0, "several_faces": 0, "unreadable": 0}
    report = []
    for split in SPLITS:
        path = split_csv_path(cfg, split)
        frame, _ = screen_rows(read_dataset_csv(path, cfg.max_age), cfg.data_dir, path)
        frame = frame.reset_index(drop=True)
        results = align_rows(cfg, frame, source, template)
        written = np.array([result.written for result in results])
        for image_name, result in zip(frame["image_name"], results, strict=True):
            if not result.written or result.faces_found > 1:
                report.append({"split": split, "image_name": image_name, "faces_found": result.faces_found,
                               "aligned": result.written, "reason": result.reason})
        counts["photos"] += len(frame)
        counts["aligned"] += int(written.sum())
        counts["no_face"] += sum(result.reason == "no face found" for result in results)
        counts["unreadable"] += sum(result.reason.startswith("unreadable") for result in results)
        counts["several_faces"] += sum(result.faces_found > 1 for result in results)
        aligned = frame[written].assign(
            image_name=[aligned_name(source, name) for name in frame.loc[written, "image_name"]], source=source)
        if aligned.empty:
            raise DataError(f"no face was found in the {len(frame)} photos of {path}; check --data_dir (the photos "
                            "must show a face of at least a sixth of their side)")
        write_csv(aligned, output_dir / f"{split}_set.csv")
        print(f"{split:>5}: {int(written.sum())} of {len(frame)} photos aligned -> {output_dir / f'{split}_set.csv'}")
    write_csv(pd.DataFrame(report, columns=["split", "image_name", "faces_found", "aligned", "reason"]),
              output_dir / "alignment_report.csv")
    print(f"{source}: {counts['aligned']} of {counts['photos']} photos aligned ({cfg.alignment_template} template, "
          f"{cfg.aligned_size} px, {cfg.align_method}); no face in {counts['no_face']}, several faces in "
          f"{counts['several_faces']} (the centred one kept), unreadable {counts['unreadable']}; listed in "
          f"{output_dir / 'alignment_report.csv'}")
    return counts


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
