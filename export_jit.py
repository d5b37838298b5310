"""Export a checkpoint to TorchScript (default) or ONNX, with a parity check against the eager model.

Reads:  --checkpoint (a train.py best.pt; '' = the newest checkpoints/*/best.pt).
Writes: model.torchscript (or model.onnx with --format=onnx) beside the checkpoint. Both carry the training
        config and the crop geometry (TorchScript: `_extra_files` config.json and crop_geometry.json; ONNX: metadata
        properties "config" and "crop_geometry"), so inference.py runs them with no model code and no guessing.

The model is traced (torch.jit.trace works for every backbone, ViT included) in eval mode, fp32, on the CPU.
Input: "images" (B, 3, S, S) float, normalised as the config says; output: "ages" (B,) in years; the batch axis
is dynamic in both. Parity: the exported model and the eager one run on a random batch of another size; the
export fails loudly if the largest difference exceeds 1e-4 years (TorchScript) or 1e-3 years (ONNX Runtime,
whose kernels sum in a different order).

Run:  python export_jit.py [--checkpoint=checkpoints/<run>/best.pt] [--format=onnx]
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

from config import Config, atomic_write_path, config_to_dict, parse_config, print_config
from model import load_model, newest_checkpoint

TOLERANCE = {"torchscript": 1e-4, "onnx": 1e-3}  # years


class ExportError(RuntimeError):
    """The exported model does not reproduce the eager model."""


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    traced = torch.jit.freeze(traced.eval())
    with atomic_write_path(path) as temporary:
        torch.jit.save(traced, str(temporary), _extra_files=metadata)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    with atomic_write_path(path) as temporary, warnings.catch_warnings():
        # forward's raw_outputs flag is traced as its default (False: ages in years), which is what is wanted
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        torch.onnx.export(
            model, (example,), str(temporary), input_names=["images"], output_names=["ages"],
            dynamic_axes={"images": {0: "batch"}, "ages": {0: "batch"}}, opset_version=17, dynamo=False,
        )
        graph = onnx.load(str(temporary))
        for key, value in metadata.items():
            graph.metadata_props.add(key=key.removesuffix(".json"), value=value)
        onnx.save(graph, str(temporary))


def is_export(path: Path) -> bool:
    """Whether a file is an export this script wrote (TorchScript with config.json, or ONNX with "config")."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/extra/config.json") for name in archive.namelist())
        import onnx

        return any(entry.key == "config" for entry in onnx.load(str(path), load_external_data=False).metadata_props)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def claim_output(path: Path, checkpoint_path: Path) -> None:
    """Stop before exporting if the output is the checkpoint itself or an existing file that is not an export."""
    if path.resolve() == checkpoint_path.resolve():
        raise SystemExit(f"error: --output={path} is the checkpoint being exported; choose another name (e.g. "
                         f"{checkpoint_path.with_name('model.torchscript')})")
    if path.is_dir() or (path.exists() and not is_export(path)):
        raise SystemExit(f"error: --output={path} exists and is not an export written by export_jit.py; choose "
                         "another name, it is never replaced")


def exported_outputs(path: Path, export_format: str, images: torch.Tensor) -> torch.Tensor:
    """Run an exported file the way inference.py does."""
    if export_format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path)).eval()(images)


def main(cfg: Config) -> dict:
    """Export, reload and compare; returns {path, format, max_abs_difference}."""
    print_config(cfg, "export_jit.py")
    # torch marks TorchScript and the TorchScript-based ONNX exporter as deprecated in favour of torch.export;
    # both still work and are what inference.py loads without model code, so their notices are silenced here.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX")

    checkpoint_path = Path(cfg.checkpoint) if cfg.checkpoint else newest_checkpoint(cfg)
    model, trained_cfg, checkpoint = load_model(checkpoint_path, "cpu")
    model = model.float().eval()
    metadata = {"config.json": json.dumps(config_to_dict(trained_cfg)),  # resolved: normalisation, filter, head
                "crop_geometry.json": json.dumps(checkpoint.get("crop_geometry"))}
    size = trained_cfg.image_size
    torch.manual_seed(0)
    example = torch.randn(2, 3, size, size)  # (B, 3, S, S)
    suffix = "onnx" if cfg.format == "onnx" else "torchscript"
    final_path = Path(cfg.output) if cfg.output else checkpoint_path.with_name(f"model.{suffix}")
    claim_output(final_path, checkpoint_path)
    # exported under a temporary name and renamed only once the parity check passes: a failed export leaves an
    # earlier good one in place
    path = final_path.with_name(f".{final_path.stem}.{os.getpid()}.checking{final_path.suffix}")
    try:
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
        os.replace(path, final_path)
    finally:
        path.unlink(missing_ok=True)  # the temporary file, if anything above failed
    path = final_path
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); run it with "
          f"python inference.py --checkpoint={path} --input=...")
    return {"path": str(path), "format": cfg.format, "max_abs_difference": difference}


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
