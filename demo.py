"""Every stage end to end on a generated data set: offline, no download, a few minutes on a laptop CPU.

Generates demo_num_images synthetic faces in UTKFace's file-name format, then runs eda -> split -> train
(ResNet-18 from scratch, 64 px) -> evaluation of the saved best checkpoint on the test split, and prints the
test MAE beside the MAE of always predicting the mean training age.

The faces are drawn procedurally and change with age the way real faces do, so a model has something real
to learn: children have rounder heads with large, low-set eyes; faces lengthen through adolescence; forehead
lines, crow's feet and nasolabial folds deepen from the thirties; hair greys from the forties and men's
hairlines recede; skin gets blotchier. Gender changes hair length, beard and jaw; ethnicity changes skin and
hair colour. Every image gets random pose, scale, lighting, background and sensor noise.

Writes: everything under demo_output/ (UTKFace/, csv_dataset/, pics/, checkpoints/, runs/, cache/), so the
demo never overwrites a real experiment's files.

Run:  python demo.py [--epochs=8] [--demo_num_images=2400] [any other config key]
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from config import RECIPE_FIELDS, RUN_FIELDS, Config, folders_under, parse_config
from files import record_written, remove_ours, written_by_us

DEMO_ROOT = Path("demo_output")
DEMO_DEFAULTS = Config(
    data_dir=str(DEMO_ROOT / "UTKFace"),
    **folders_under(DEMO_ROOT),
    run_name="demo",
    model_name="resnet18",
    pretrained=False,
    image_size=64,
    epochs=10,
    batch_size=64,
    lr=2e-3,
    weight_decay=5e-4,
    erase_probability=0.0,  # the scratch recipe: erasing slows a short run from random weights down
)
GENERATED_SIZE = 96  # pixels of the saved JPEGs (UTKFace's are 200; smaller keeps the demo fast)
SKIN_TONES = {  # mean RGB per ethnicity label
    "white": (232, 196, 170), "black": (120, 82, 58), "asian": (226, 190, 150),
    "indian": (176, 128, 94), "others": (198, 150, 118),
}
HAIR_COLOURS = {
    "white": [(90, 60, 35), (200, 160, 90), (60, 40, 25)], "black": [(25, 20, 18)], "asian": [(22, 18, 16)],
    "indian": [(30, 22, 18)], "others": [(50, 35, 25), (80, 55, 35)],
}


def sample_labels(count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(age, gender code, race code) with an age mix shaped like UTKFace's (many infants and 20-35s)."""
    component = rng.choice(3, size=count, p=[0.15, 0.5, 0.35])
    ages = np.where(component == 0, rng.integers(1, 10, count),
                    np.where(component == 1, rng.normal(29, 8, count), rng.uniform(10, 90, count)))
    ages = np.clip(np.round(ages), 1, 90).astype(int)
    genders = rng.integers(0, 2, count)
    races = rng.choice(5, size=count, p=[0.42, 0.19, 0.15, 0.17, 0.07])
    return list(zip(ages.tolist(), genders.tolist(), races.tolist(), strict=False))


def _mix(colour_a: tuple, colour_b: tuple, weight: float) -> tuple[int, int, int]:
    return tuple(int(a * (1 - weight) + b * weight) for a, b in zip(colour_a, colour_b, strict=False))


@dataclass
class FaceSketch:
    """Where one synthetic face's parts sit on the drawing canvas (pixels) and how aged it looks (0..1 shares)."""

    female: bool
    growth: float  # 0 at birth, 1 at adulthood
    wrinkling: float  # depth of lines
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    center_x: float
    center_y: float
    width: float
    height: float
    recession: float = 0.0  # how far a man's hairline has receded
    eye_y: float = 0.0
    eye_dx: float = 0.0
    eye_radius: float = 0.0
    nose_y: float = 0.0
    mouth_y: float = 0.0

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.center_x - self.width / 2, self.center_y - self.height / 2, self.center_x + self.width / 2,
                self.center_y + self.height / 2)


def sketch_face(age: int, gender: str, ethnicity: str, canvas: int, rng: np.random.Generator) -> FaceSketch:
    """The face's colours and outline for its age, gender and ethnicity."""
    growth = min(age, 20) / 20.0
    greying = 1 / (1 + math.exp(-(age - 48) / 7))  # share of grey hair
    skin = _mix(SKIN_TONES[ethnicity], (int(rng.integers(0, 255)),) * 3, 0.08)
    skin = tuple(int(np.clip(value + rng.normal(0, 8), 0, 255)) for value in skin)
    hair_options = HAIR_COLOURS[ethnicity]
    hair = _mix(hair_options[int(rng.integers(len(hair_options)))], (205, 205, 208), greying)
    center_x = canvas * (0.5 + rng.normal(0, 0.02))
    center_y = canvas * (0.54 + rng.normal(0, 0.02))
    width = canvas * (0.62 - 0.08 * growth + rng.normal(0, 0.015)) * (1.04 if gender == "male" else 0.98)
    height = width * (1.02 + 0.30 * growth + rng.normal(0, 0.02))
    return FaceSketch(gender == "female", growth, float(np.clip((age - 28) / 45, 0, 1)), skin, hair, center_x,
                      center_y, width, height)


def draw_head(draw: ImageDraw.ImageDraw, face: FaceSketch, age: int, rng: np.random.Generator) -> None:
    """Hair behind the face, the face, a squarer jaw for men, hair on top (men's hairline recedes with age)."""
    left, top, right, bottom = face.box
    if face.female or age < 4 or rng.random() < 0.15:  # long hair behind the face
        hair_length = (0.25 + 0.5 * rng.random()) * face.height if face.female else 0.1 * face.height
        draw.rounded_rectangle((left - 0.12 * face.width, top - 0.1 * face.height, right + 0.12 * face.width,
                                bottom + hair_length - 0.2 * face.height), radius=int(face.width * 0.3),
                               fill=face.hair)
    draw.ellipse((left, top, right, bottom), fill=face.skin)
    if not face.female and age > 16:
        draw.rectangle((left + 0.08 * face.width, face.center_y, right - 0.08 * face.width,
                        bottom - 0.12 * face.height), fill=face.skin)
    if not face.female:
        face.recession = 0.35 * face.wrinkling + 0.2 * rng.random() * face.wrinkling
    if age >= 1:
        hair_bottom = top + face.height * (0.22 - face.recession * 0.5 + 0.06 * (1 - face.growth))
        draw.chord((left - 0.04 * face.width, top - 0.08 * face.height, right + 0.04 * face.width,
                    hair_bottom + 0.2 * face.height), 180, 360, fill=face.hair)


def draw_features(draw: ImageDraw.ImageDraw, face: FaceSketch, scale: int, rng: np.random.Generator) -> None:
    """Eyes (lower and larger in children) with brows, nose and mouth; records where they are on `face`."""
    top = face.box[1]
    face.eye_y = top + face.height * (0.56 - 0.13 * face.growth)
    face.eye_dx = face.width * 0.21
    face.eye_radius = radius = face.width * (0.085 - 0.03 * face.growth)
    iris = tuple(int(value) for value in rng.integers(20, 90, 3))
    for side in (-1, 1):
        eye_x = face.center_x + side * face.eye_dx
        draw.ellipse((eye_x - radius * 1.4, face.eye_y - radius, eye_x + radius * 1.4, face.eye_y + radius),
                     fill=(245, 245, 240))
        draw.ellipse((eye_x - radius * 0.7, face.eye_y - radius * 0.7, eye_x + radius * 0.7,
                      face.eye_y + radius * 0.7), fill=iris)
        draw.line((eye_x - radius * 1.6, face.eye_y - radius * 2.0, eye_x + radius * 1.6, face.eye_y - radius * 2.2),
                  fill=_mix(face.hair, (0, 0, 0), 0.2), width=int(scale * (1.5 + (not face.female))))
    face.nose_y = face.eye_y + face.height * (0.12 + 0.06 * face.growth)
    draw.line((face.center_x, face.eye_y + radius, face.center_x - face.width * 0.04, face.nose_y),
              fill=_mix(face.skin, (0, 0, 0), 0.3), width=scale * 2)
    face.mouth_y = face.nose_y + face.height * (0.09 + 0.04 * face.growth)
    mouth_half = face.width * (0.13 + 0.04 * face.growth)
    lips = _mix(face.skin, (150, 40, 50), 0.5 if face.female else 0.3)
    draw.arc((face.center_x - mouth_half, face.mouth_y - face.height * 0.04, face.center_x + mouth_half,
              face.mouth_y + face.height * 0.04), 10, 170, fill=lips, width=scale * 3)


def draw_age_marks(draw: ImageDraw.ImageDraw, face: FaceSketch, age: int, scale: int,
                   rng: np.random.Generator) -> None:
    """Forehead lines, nasolabial folds and crow's feet deepening with age, a beard, age spots."""
    left, top, right, bottom = face.box
    line_colour = _mix(face.skin, (30, 20, 15), 0.25 + 0.35 * face.wrinkling)
    line_width = max(1, int(scale * (0.6 + 1.4 * face.wrinkling)))
    if face.wrinkling > 0:
        for index in range(round(1 + 4 * face.wrinkling)):  # forehead lines
            y = top + face.height * (0.18 + 0.05 * index) + face.recession * 0.1 * face.height
            box = (left + 0.2 * face.width, y - 0.03 * face.height, right - 0.2 * face.width, y + 0.03 * face.height)
            draw.arc(box, 200, 340, fill=line_colour, width=line_width)
        for side in (-1, 1):  # nasolabial folds
            x = face.center_x + side * face.width * 0.12
            draw.line((x, face.nose_y - 0.02 * face.height, x + side * face.width * 0.08,
                       face.mouth_y + 0.03 * face.height), fill=line_colour, width=line_width)
    if age > 38:
        for side in (-1, 1):  # crow's feet
            x = face.center_x + side * (face.eye_dx + face.eye_radius * 1.6)
            for angle in (-0.4, 0.0, 0.4)[: 1 + int(face.wrinkling * 3)]:
                draw.line((x, face.eye_y, x + side * face.width * 0.07 * math.cos(angle),
                           face.eye_y + face.width * 0.07 * math.sin(angle)), fill=line_colour, width=line_width)
    if not face.female and age > 17 and rng.random() < 0.35:  # beard, greying like the hair
        draw.chord((left + 0.05 * face.width, face.mouth_y - 0.1 * face.height, right - 0.05 * face.width,
                    bottom + 0.02 * face.height), 0, 180, fill=_mix(face.hair, face.skin, 0.25))
    if age > 55:  # age spots
        for _ in range(int(rng.integers(2, 8))):
            x = rng.uniform(left + 0.15 * face.width, right - 0.15 * face.width)
            y = rng.uniform(top + 0.3 * face.height, bottom - 0.2 * face.height)
            radius = rng.uniform(1.0, 2.5) * scale
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_mix(face.skin, (90, 60, 40), 0.35))


def photograph(image: Image.Image, background: tuple[int, ...], size: int, wrinkling: float,
               rng: np.random.Generator) -> Image.Image:
    """Pose, scale, downsampling, lighting from one side and sensor noise."""
    canvas = image.width
    image = image.rotate(rng.normal(0, 6), resample=Image.Resampling.BILINEAR, fillcolor=background,
                         translate=(rng.normal(0, 0.03) * canvas, rng.normal(0, 0.03) * canvas))
    image = image.resize((size, size), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
    pixels = np.asarray(image, dtype=np.float32)
    gradient = np.linspace(-1, 1, size)[None, :, None] * rng.normal(0, 0.15)  # (1, S, 1)
    pixels = pixels * rng.uniform(0.75, 1.2) * (1 + gradient) + rng.normal(0, 4 + 6 * wrinkling, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_face(
    age: int, gender: str, ethnicity: str, rng: np.random.Generator, size: int = GENERATED_SIZE
) -> Image.Image:
    """One synthetic aligned face crop (RGB, size x size) whose look follows age, gender and ethnicity."""
    scale = 4  # draw large, then downsample: smooth edges
    background = tuple(int(value) for value in rng.integers(40, 220, 3))
    image = Image.new("RGB", (size * scale, size * scale), background)
    draw = ImageDraw.Draw(image)
    face = sketch_face(age, gender, ethnicity, size * scale, rng)
    draw_head(draw, face, age, rng)
    draw_features(draw, face, scale, rng)
    draw_age_marks(draw, face, age, scale, rng)
    return photograph(image, background, size, face.wrinkling, rng)


def generate_dataset(folder: str | Path, count: int, seed: int = 0, size: int = GENERATED_SIZE,
                     first_index: int = 0) -> list[Path]:
    """Write `count` faces as JPEGs named [age]_[gender]_[race]_[date&time].jpg.chip.jpg; returns the paths.
    first_index numbers the names from there (parallel writers into one folder each take their own range)."""
    from custom_dataset_dataloader import ETHNICITIES, GENDERS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (age, gender, race) in enumerate(sample_labels(count, rng)):
        path = folder / f"{age}_{gender}_{race}_2026010112{first_index + index:07d}.jpg.chip.jpg"
        draw_face(age, GENDERS[gender], ETHNICITIES[race], rng, size).save(path, quality=90)
        paths.append(path)
    return paths


SETTINGS = (*RECIPE_FIELDS, *RUN_FIELDS, "demo_num_images")  # what this script reads (its --help)


def main(cfg: Config) -> dict:
    """Generate (once) the demo faces, then eda -> split -> train -> evaluate; returns the test metrics."""
    import eda
    import split_dataset
    import train

    started = time.perf_counter()
    data_dir = Path(cfg.data_dir)
    existing = list(data_dir.glob("*.jpg")) if data_dir.is_dir() else []
    if len(existing) != cfg.demo_num_images:
        # only faces an earlier demo generated (and recorded) are removed: a --data_dir of real photos is never
        # touched, and a folder holding any photo of someone else's is refused
        if not all(written_by_us(path) for path in existing):
            raise SystemExit(f"error: --data_dir={data_dir} holds images the demo did not generate; give the demo "
                             "a folder of its own (the default is demo_output/data)")
        for path in existing:
            remove_ours(path)
        print(f"generating {cfg.demo_num_images} synthetic faces in {data_dir}/ ...", flush=True)
        for path in generate_dataset(data_dir, cfg.demo_num_images, seed=cfg.seed):
            record_written(path)
    print(f"\n=== 1/4 eda.py ({time.perf_counter() - started:.0f}s) ===")
    eda.main(cfg)
    print(f"\n=== 2/4 split_dataset.py ({time.perf_counter() - started:.0f}s) ===")
    split_dataset.main(cfg)
    print(f"\n=== 3/4 train.py ({time.perf_counter() - started:.0f}s) ===")
    results = train.main(cfg)

    print(f"\n=== 4/4 evaluation of the saved best checkpoint ({time.perf_counter() - started:.0f}s) ===")
    metrics = train.evaluate_checkpoint(results["best_checkpoint"], "test", cache_dir=cfg.cache_dir)
    print(f"reloaded {results['best_checkpoint']} (architecture and size from its stored config)")
    print(f"test MAE {metrics['mae']:.2f} years, CS@5 {metrics['cs5']:.3f} (fp32); predicting the mean training age "
          f"gives MAE {results['mean_age_baseline_test_mae']:.2f}")
    print(f"\noutputs: faces {data_dir}/, CSVs {cfg.csv_dir}/, figures {cfg.pics_dir}/, checkpoints "
          f"{results['best_checkpoint']}, TensorBoard `tensorboard --logdir {cfg.runs_dir}`")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return {**results, "reloaded_test_mae": metrics["mae"], "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], base=DEMO_DEFAULTS, reads=SETTINGS))
