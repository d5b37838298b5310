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
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from config import Config, folders_under, parse_config

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


def draw_face(
    age: int, gender: str, ethnicity: str, rng: np.random.Generator, size: int = GENERATED_SIZE
) -> Image.Image:
    """One synthetic aligned face crop (RGB, size x size) whose look follows age, gender and ethnicity."""
    scale = 4  # draw large, then downsample: smooth edges
    canvas = size * scale
    background = tuple(int(value) for value in rng.integers(40, 220, 3))
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    growth = min(age, 20) / 20.0  # 0 at birth, 1 at adulthood
    greying = 1 / (1 + math.exp(-(age - 48) / 7))  # share of grey hair
    wrinkling = float(np.clip((age - 28) / 45, 0, 1))  # depth of lines

    skin = _mix(SKIN_TONES[ethnicity], (int(rng.integers(0, 255)),) * 3, 0.08)
    skin = tuple(int(np.clip(value + rng.normal(0, 8), 0, 255)) for value in skin)
    hair_options = HAIR_COLOURS[ethnicity]
    hair = _mix(hair_options[int(rng.integers(len(hair_options)))], (205, 205, 208), greying)

    center_x = canvas * (0.5 + rng.normal(0, 0.02))
    center_y = canvas * (0.54 + rng.normal(0, 0.02))
    face_width = canvas * (0.62 - 0.08 * growth + rng.normal(0, 0.015)) * (1.04 if gender == "male" else 0.98)
    face_height = face_width * (1.02 + 0.30 * growth + rng.normal(0, 0.02))
    left, right = center_x - face_width / 2, center_x + face_width / 2
    top, bottom = center_y - face_height / 2, center_y + face_height / 2

    female = gender == "female"
    if female or age < 4 or rng.random() < 0.15:  # long hair behind the face
        hair_length = (0.25 + 0.5 * rng.random()) * face_height if female else 0.1 * face_height
        draw.rounded_rectangle((left - 0.12 * face_width, top - 0.1 * face_height, right + 0.12 * face_width,
                                bottom + hair_length - 0.2 * face_height), radius=int(face_width * 0.3), fill=hair)
    draw.ellipse((left, top, right, bottom), fill=skin)
    if not female and age > 16:  # a squarer jaw
        draw.rectangle((left + 0.08 * face_width, center_y, right - 0.08 * face_width, bottom - 0.12 * face_height),
                       fill=skin)
    # hair on top: men's hairline recedes with age
    recession = (0.35 * wrinkling + 0.2 * rng.random() * wrinkling) if not female else 0.0
    if age >= 1:
        hair_bottom = top + face_height * (0.22 - recession * 0.5 + 0.06 * (1 - growth))
        draw.chord((left - 0.04 * face_width, top - 0.08 * face_height, right + 0.04 * face_width,
                    hair_bottom + 0.2 * face_height), 180, 360, fill=hair)

    # eyes: lower and larger in children
    eye_y = top + face_height * (0.56 - 0.13 * growth)
    eye_dx = face_width * 0.21
    eye_radius = face_width * (0.085 - 0.03 * growth)
    iris = tuple(int(value) for value in rng.integers(20, 90, 3))
    for side in (-1, 1):
        eye_x = center_x + side * eye_dx
        draw.ellipse((eye_x - eye_radius * 1.4, eye_y - eye_radius, eye_x + eye_radius * 1.4, eye_y + eye_radius),
                     fill=(245, 245, 240))
        draw.ellipse((eye_x - eye_radius * 0.7, eye_y - eye_radius * 0.7, eye_x + eye_radius * 0.7,
                      eye_y + eye_radius * 0.7), fill=iris)
        brow_colour = _mix(hair, (0, 0, 0), 0.2)
        draw.line((eye_x - eye_radius * 1.6, eye_y - eye_radius * 2.0, eye_x + eye_radius * 1.6,
                   eye_y - eye_radius * 2.2), fill=brow_colour, width=int(scale * (1.5 + (not female))))
    # nose and mouth
    nose_y = eye_y + face_height * (0.12 + 0.06 * growth)
    draw.line((center_x, eye_y + eye_radius, center_x - face_width * 0.04, nose_y), fill=_mix(skin, (0, 0, 0), 0.3),
              width=scale * 2)
    mouth_y = nose_y + face_height * (0.09 + 0.04 * growth)
    mouth_half = face_width * (0.13 + 0.04 * growth)
    lips = _mix(skin, (150, 40, 50), 0.5 if female else 0.3)
    draw.arc((center_x - mouth_half, mouth_y - face_height * 0.04, center_x + mouth_half,
              mouth_y + face_height * 0.04), 10, 170, fill=lips, width=scale * 3)

    line_colour = _mix(skin, (30, 20, 15), 0.25 + 0.35 * wrinkling)
    line_width = max(1, int(scale * (0.6 + 1.4 * wrinkling)))
    if wrinkling > 0:
        for index in range(round(1 + 4 * wrinkling)):  # forehead lines
            y = top + face_height * (0.18 + 0.05 * index) + recession * 0.1 * face_height
            box = (left + 0.2 * face_width, y - 0.03 * face_height, right - 0.2 * face_width, y + 0.03 * face_height)
            draw.arc(box, 200, 340, fill=line_colour, width=line_width)
        for side in (-1, 1):  # nasolabial folds
            x = center_x + side * face_width * 0.12
            draw.line((x, nose_y - 0.02 * face_height, x + side * face_width * 0.08, mouth_y + 0.03 * face_height),
                      fill=line_colour, width=line_width)
    if age > 38:
        for side in (-1, 1):  # crow's feet
            x = center_x + side * (eye_dx + eye_radius * 1.6)
            for angle in (-0.4, 0.0, 0.4)[: 1 + int(wrinkling * 3)]:
                draw.line((x, eye_y, x + side * face_width * 0.07 * math.cos(angle),
                           eye_y + face_width * 0.07 * math.sin(angle)), fill=line_colour, width=line_width)
    if not female and age > 17 and rng.random() < 0.35:  # beard, greying like the hair
        beard = _mix(hair, skin, 0.25)
        draw.chord((left + 0.05 * face_width, mouth_y - 0.1 * face_height, right - 0.05 * face_width,
                    bottom + 0.02 * face_height), 0, 180, fill=beard)
    if age > 55:  # age spots
        for _ in range(int(rng.integers(2, 8))):
            x = rng.uniform(left + 0.15 * face_width, right - 0.15 * face_width)
            y = rng.uniform(top + 0.3 * face_height, bottom - 0.2 * face_height)
            radius = rng.uniform(1.0, 2.5) * scale
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_mix(skin, (90, 60, 40), 0.35))

    # pose, scale, downsample, lighting and noise
    image = image.rotate(rng.normal(0, 6), resample=Image.Resampling.BILINEAR, fillcolor=background,
                         translate=(rng.normal(0, 0.03) * canvas, rng.normal(0, 0.03) * canvas))
    image = image.resize((size, size), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
    pixels = np.asarray(image, dtype=np.float32)
    gradient = np.linspace(-1, 1, size)[None, :, None] * rng.normal(0, 0.15)  # light from one side
    pixels = pixels * rng.uniform(0.75, 1.2) * (1 + gradient) + rng.normal(0, 4 + 6 * wrinkling, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


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


def main(cfg: Config) -> dict:
    """Generate (once) the demo faces, then eda -> split -> train -> evaluate; returns the test metrics."""
    import eda
    import split_dataset
    import train

    started = time.perf_counter()
    data_dir = Path(cfg.data_dir)
    existing = list(data_dir.glob("*.jpg")) if data_dir.is_dir() else []
    if len(existing) != cfg.demo_num_images:
        for path in existing:
            path.unlink()
        print(f"generating {cfg.demo_num_images} synthetic faces in {data_dir}/ ...", flush=True)
        generate_dataset(data_dir, cfg.demo_num_images, seed=cfg.seed)
    print(f"\n=== 1/4 eda.py ({time.perf_counter() - started:.0f}s) ===")
    eda.main(cfg)
    print(f"\n=== 2/4 split_dataset.py ({time.perf_counter() - started:.0f}s) ===")
    split_dataset.main(cfg)
    print(f"\n=== 3/4 train.py ({time.perf_counter() - started:.0f}s) ===")
    results = train.main(cfg)

    print(f"\n=== 4/4 evaluation of the saved best checkpoint ({time.perf_counter() - started:.0f}s) ===")
    metrics = train.evaluate_checkpoint(results["best_checkpoint"], "test")
    print(f"reloaded {results['best_checkpoint']} (architecture and size from its stored config)")
    print(f"test MAE {metrics['mae']:.2f} years, CS@5 {metrics['cs5']:.3f} (fp32); predicting the mean training age "
          f"gives MAE {results['mean_age_baseline_test_mae']:.2f}")
    print(f"\noutputs: faces {data_dir}/, CSVs {cfg.csv_dir}/, figures {cfg.pics_dir}/, checkpoints "
          f"{results['best_checkpoint']}, TensorBoard `tensorboard --logdir {cfg.runs_dir}`")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return {**results, "reloaded_test_mae": metrics["mae"], "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], base=DEMO_DEFAULTS))
