"""Export a checkpoint to TorchScript (default) or ONNX, with a parity check against the eager model.

Reads:  --checkpoint (a train.py best.pt; '' = the shipped model, 'latest' = your newest finished run's best.pt).
Writes: model.torchscript (or model.onnx with --format=onnx) beside the checkpoint. Both carry the training
        config, the crop geometry and the training faces' resolution (TorchScript: `_extra_files` config.json,
        crop_geometry.json and face_resolution.json; ONNX: metadata properties "config", "crop_geometry" and
        "face_resolution"), so inference.py runs them with no model code and no guessing.
        --format=half writes <checkpoint>.half.pt (or --output): the checkpoint with fp16 weights, the format of the
        shipped model (models/), checked against the fp32 model and printed with its SHA-256.

The model is traced (torch.jit.trace works for every backbone, ViT included) in eval mode, fp32, on the CPU.
Input: "images" (B, 3, S, S) float, normalised as the config says; output: "ages" (B,) in years; the batch axis
is dynamic in both. Parity: the exported model and the eager one run on a random batch of another size; the
export fails loudly if the largest difference exceeds 1e-4 years (TorchScript) or 1e-3 years (ONNX Runtime,
whose kernels sum in a different order).

--format=onnx --quantize=int8 also writes model.int8.onnx: ONNX Runtime's static int8 quantisation (QDQ, weights
per channel), calibrated on CALIBRATION_IMAGES training crops; INT8_METHODS are tried fastest first (unsigned
activations, then signed, then dynamic) and the first within tolerance is kept.
Its parity check is in years on the real test split: the int8 model's test MAE may differ from the fp32 export's
by at most INT8_TOLERANCE_YEARS, or it is not written. It needs the training images (--data_dir, --csv_dir; the
checkpoint's own by default).

Run:  python export_jit.py [--checkpoint=checkpoints/<run>/best.pt] [--format=onnx [--quantize=int8]]
      python export_jit.py --checkpoint=checkpoints/<run>/best.pt --format=half --output=models/age_lite0_mix.pt
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import Config, UsageError, parse_config, print_config, recipe_dict, stored_recipe_for_run
from faces import geometries_from_dict
from files import atomic_write_path, check_free_space, claim_outputs, file_sha256, folder_lock, scratch_path
from model import SHIPPED_MODEL, choose_model_files, fold_batch_norms, half_precision_checkpoint, load_model

# years; half: fp16 weights move each age by a few hundredths (the shipped model's figure is in models/README.md)
TOLERANCE = {"torchscript": 1e-4, "onnx": 1e-3, "half": 0.25}
INT8_TOLERANCE_YEARS = 0.1  # the most the test MAE may change through int8 quantisation
CALIBRATION_IMAGES = 300  # training crops whose activations set the int8 ranges


class ExportError(UsageError):
    """The exported model does not reproduce the eager model (a one-sentence stop, like every UsageError)."""


# Both write straight to `path`, which main() gives a temporary name and renames only after the parity check (one
# temporary name, never a temporary of a temporary).
def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    traced = torch.jit.freeze(traced.eval())
    torch.jit.save(traced, str(path), _extra_files=metadata)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    with warnings.catch_warnings():
        # forward's raw_outputs flag is traced as its default (False: ages in years), which is what is wanted
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        torch.onnx.export(
            model, (example,), str(path), input_names=["images"], output_names=["ages"],
            dynamic_axes={"images": {0: "batch"}, "ages": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    store_onnx_metadata(path, metadata)


def store_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace an ONNX file's metadata properties with `metadata` (keys without their .json: "config", ...)."""
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key.removesuffix(".json"), value=value)
    onnx.save(graph, str(path))


def claim_output(path: Path, checkpoint_path: Path) -> None:
    """Stop before exporting if the output is the checkpoint itself, or exists and is not ours (files.py)."""
    if path.resolve() == checkpoint_path.resolve():
        raise SystemExit(f"error: --output={path} is the checkpoint being exported; choose another name (e.g. "
                         f"{checkpoint_path.with_name('model.torchscript')})")
    claim_outputs([path], [checkpoint_path], "export_jit.py")


def _session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def exported_outputs(path: Path, export_format: str, images: torch.Tensor) -> torch.Tensor:
    """Run an exported file the way inference.py does."""
    if export_format == "onnx":
        return torch.from_numpy(_session(path).run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path)).eval()(images)


def onnx_mae(session: Any, loader: Any) -> float:
    """Mean error in years of an ONNX Runtime session over a loader of (images, labels, ...) batches: |error| for
    exact ages, the distance to the bin for binned labels (model.label_error)."""
    from model import label_error

    errors = [label_error(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), ages).numpy()
              for images, ages, *_ in loader]
    return float(np.concatenate(errors).mean())


INT8_METHODS = ("u8s8", "s8s8", "dynamic")  # tried in this order: the fastest first, the first within tolerance wins


def write_int8(fp32_path: Path, output: Path, calibration: Iterable[np.ndarray], method: str = "u8s8") -> None:
    """Quantise an fp32 ONNX file to int8, leaving the head in float. Used by the export and by benchmarks.pipeline.
    u8s8 / s8s8: static QDQ calibrated on `calibration` (batches of (B, 3, S, S) float32 images), unsigned or
    signed-symmetric activations, int8 weights per channel; dynamic: weights only."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    class Crops(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with scratch_path(fp32_path.with_name("prepared.onnx")) as prepared:
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + folding: what quantisation expects
        # the head stays in float: the age is an expectation over 100+ logits (or a de-standardised regression),
        # where 8-bit rounding shows directly in years, and it costs nothing next to the backbone
        head_nodes = [node.name for node in onnx.load(str(prepared)).graph.node
                      if not node.name.startswith("/backbone")]
        # u8s8 runs on the CPU's int8 dot-product instructions (measured 2.9x fp32 for ResNet-18 on the 2-core
        # EPYC); s8s8 is slower than fp32 there but kept the 128 px Lite0 within 0.07 years where u8s8 lost 0.35
        if method in ("u8s8", "s8s8"):
            signed = method == "s8s8"
            quantize_static(str(prepared), str(output), Crops(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8 if signed else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=head_nodes,
                            extra_options={"ActivationSymmetric": signed})
        else:
            quantize_dynamic(str(prepared), str(output), weight_type=QuantType.QInt8, nodes_to_exclude=head_nodes)


def quantize_int8(fp32_path: Path, cfg: Config, trained_cfg: Config, metadata: dict[str, str]) -> dict[str, Any]:
    """Write the int8 ONNX model beside the fp32 one, parity-checked in years on the test split."""
    from torch.utils.data import DataLoader, Subset

    from custom_dataset_dataloader import build_dataset

    data_cfg = stored_recipe_for_run(trained_cfg, cfg, ("cache_dir", "num_workers"))
    train_set, test_set = build_dataset(data_cfg, "train", train=False), build_dataset(data_cfg, "test")
    picks = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:CALIBRATION_IMAGES]
    calibration = DataLoader(Subset(train_set, picks.tolist()), batch_size=1)  # equal shapes for every calibrator

    final = fp32_path.with_name(f"{fp32_path.stem}.int8.onnx")
    claim_output(final, fp32_path)
    test_loader = DataLoader(test_set, batch_size=64)
    fp32_mae = onnx_mae(_session(fp32_path), test_loader)
    results = {}
    # every form is written to one temporary, renamed into place only once one passes the check
    with atomic_write_path(final, record=True) as candidate:
        for method in INT8_METHODS:
            write_int8(fp32_path, candidate, (images.numpy() for images, *_ in calibration), method)
            try:
                int8_mae = onnx_mae(_session(candidate), test_loader)
            except Exception as error:  # noqa: BLE001 - e.g. an int8 kernel that refuses a tiny feature map
                print(f"int8 ({method}): ONNX Runtime cannot run it ({type(error).__name__}); trying the next form")
                results[method] = float("nan")
                continue
            results[method] = int8_mae
            print(f"int8 ({method}): test MAE {int8_mae:.3f} against fp32 {fp32_mae:.3f} years "
                  f"(tolerance {INT8_TOLERANCE_YEARS})")
            if abs(int8_mae - fp32_mae) <= INT8_TOLERANCE_YEARS:
                store_onnx_metadata(candidate, metadata)
                break
        else:
            raise ExportError(f"int8 quantisation changes the test MAE of {fp32_path} by more than "
                              f"{INT8_TOLERANCE_YEARS} years (fp32 {fp32_mae:.3f}; " + ", ".join(
                                  f"{name} {mae:.3f}" for name, mae in results.items()) + "); nothing was written")
    print(f"wrote {final} ({final.stat().st_size / 1e6:.1f} MB, {method} int8)")
    return {"int8_path": str(final), "int8_method": method, "fp32_test_mae": fp32_mae, "int8_test_mae": int8_mae}


def export_half(cfg: Config, checkpoint_path: Path, model: torch.nn.Module, size: int) -> dict:
    """--format=half: the checkpoint as fp16 weights (model.write_half_precision_checkpoint), checked against the
    fp32 model on a random batch before it is renamed into place; prints its SHA-256 (the model card's)."""
    final_path = Path(cfg.output) if cfg.output else checkpoint_path.with_name(f"{checkpoint_path.stem}.half.pt")
    claim_output(final_path, checkpoint_path)
    check_free_space(final_path.parent, 2 * sum(p.numel() for p in model.parameters()) + 20_000_000, "the fp16 copy")
    # renamed into place only once the check passes
    with folder_lock(final_path.parent, "export_jit.py"), atomic_write_path(final_path, record=True) as path:
        torch.save(half_precision_checkpoint(checkpoint_path), path)
        half_model, _, _ = load_model(path, "cpu")
        fold_batch_norms(half_model.backbone)
        check = torch.randn(5, 3, size, size)
        with torch.no_grad():
            difference = (half_model(check) - model(check)).abs().max().item()
        print(f"parity on a random batch of 5: max |fp16 weights - fp32| = {difference:.2e} years "
              f"(tolerance {TOLERANCE['half']})")
        if not difference <= TOLERANCE["half"]:
            raise ExportError(f"fp16 weights of {checkpoint_path} move an age by {difference:.2e} years; nothing "
                              "was written")
    digest = file_sha256(final_path)
    print(f"wrote {final_path} ({final_path.stat().st_size / 1e6:.1f} MB, sha256 {digest})")
    return {"path": str(final_path), "format": "half", "max_abs_difference": difference, "sha256": digest}


SETTINGS = ("checkpoint", "checkpoint_dir", "runs_dir", "output", "format", "quantize", "device", "data_dir", "csv_dir",
            "cache_dir")  # what this script reads (its --help; data for the int8 calibration and check)


def main(cfg: Config) -> dict:
    """Export, reload and compare; returns {path, format, max_abs_difference}."""
    print_config(cfg, "export_jit.py", SETTINGS)
    # torch marks TorchScript and the TorchScript-based ONNX exporter as deprecated in favour of torch.export;
    # both still work and are what inference.py loads without model code, so their notices are silenced here.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX")

    if cfg.quantize and cfg.format != "onnx":
        raise SystemExit("error: --quantize=int8 is for ONNX Runtime; add --format=onnx")
    if "," in cfg.checkpoint:
        raise SystemExit(f"error: --checkpoint={cfg.checkpoint} names several model files; an ensemble is exported "
                         "member by member (one export_jit.py run each) and run as --checkpoint=a.onnx,b.onnx")
    checkpoint_path = choose_model_files(cfg)[0]
    model, trained_cfg, checkpoint = load_model(checkpoint_path, "cpu")
    try:  # carried into the export as it is, so checked here as inference checks it
        geometries_from_dict(checkpoint.get("crop_geometry"))
    except (ValueError, TypeError, AttributeError) as error:
        raise ExportError(f"{checkpoint_path}: its stored crop geometry is damaged ({error}); nothing was "
                          "exported") from None
    model = model.float().eval()
    # the model inference.py runs for a .pt file (batch norms folded into the convolutions), so that the export and
    # the checkpoint give the same ages
    fold_batch_norms(model.backbone)
    metadata = {"config.json": json.dumps(recipe_dict(trained_cfg)),  # resolved: normalisation, filter, head
                "crop_geometry.json": json.dumps(checkpoint.get("crop_geometry")),
                "face_resolution.json": json.dumps(checkpoint.get("face_resolution"))}
    size = trained_cfg.image_size
    torch.manual_seed(0)
    example = torch.randn(2, 3, size, size)  # (B, 3, S, S)
    if cfg.format == "half":
        return export_half(cfg, checkpoint_path, model, size)
    suffix = "onnx" if cfg.format == "onnx" else "torchscript"
    # beside the checkpoint; the shipped model's exports go to checkpoint_dir/<its name>/, not into models/
    folder = (Path(cfg.checkpoint_dir) / SHIPPED_MODEL.stem if checkpoint_path.resolve() == SHIPPED_MODEL.resolve()
              else checkpoint_path.parent)
    final_path = Path(cfg.output) if cfg.output else folder / f"model.{suffix}"
    # the weights in fp32 plus the graph: twice the parameters' bytes and a margin is what a write may need
    check_free_space(final_path.parent, 2 * 4 * sum(p.numel() for p in model.parameters()) + 50_000_000,
                     f"the {cfg.format} export")
    claim_output(final_path, checkpoint_path)
    # exported to a temporary, renamed into place only once the parity check passes: a failed export leaves an
    # earlier good one as it was
    with folder_lock(final_path.parent, "export_jit.py"), atomic_write_path(final_path, record=True) as path:
        (export_onnx if cfg.format == "onnx" else export_torchscript)(model, example, path, metadata)
        check = torch.randn(5, 3, size, size)  # another batch size: the batch axis must be dynamic
        with torch.no_grad():
            expected = model(check)
        difference = (exported_outputs(path, cfg.format, check) - expected).abs().max().item()
        print(f"parity on a random batch of 5: max |exported - eager| = {difference:.2e} years "
              f"(tolerance {TOLERANCE[cfg.format]:.0e})")
        if not difference <= TOLERANCE[cfg.format]:
            raise ExportError(f"{cfg.format} export of {checkpoint_path} differs from the eager model by "
                              f"{difference:.2e} years; nothing was written")
    path = final_path
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); run it with "
          f"python inference.py --checkpoint={path} --input=...")
    result = {"path": str(path), "format": cfg.format, "max_abs_difference": difference}
    if cfg.quantize == "int8":
        with folder_lock(path.parent, "export_jit.py"):
            result |= quantize_int8(path, cfg, trained_cfg, metadata)
    return result


if __name__ == "__main__":
    main(parse_config(sys.argv[1:], reads=SETTINGS))
