"""Export a trained network as ONNX, for deployment: eval mode, a dynamic batch dimension.

    pip install -r requirements-export.txt    # onnx, onnxscript, onnxruntime: not needed to train
    python export.py -weights checkpoint/resnet50_ema/<run>/best.pth --out resnet50_ema.onnx

The file's input "images" is (batch, 3, 32, 32) float32, normalized as the run was (its mean and std
are in the file's metadata, with the network, the module and the epoch); its output "logits" is
(batch, classes). Before the file is written, onnxruntime runs it on batches of 1 and 7 images and
its outputs must equal PyTorch's within --tolerance, relative to the logits' scale; where
onnxruntime is not installed, that check is skipped, and said. EMA exports through its PyTorch path
(the fused kernels are CUDA training kernels).
"""
import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from models.attention import EMA
from training import checkpoints, cli, run_data
from utils import UserError

BATCHES = (1, 7)  # the batch sizes the file is checked at: one image, and an odd batch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    cli.add_model(p)
    cli.add_weights(p)
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=cli.positive(int), default=None,
                   help="ONNX opset (default: the exporter's)")
    p.add_argument("--tolerance", type=cli.positive(float), default=1e-3,
                   help="largest |onnxruntime - PyTorch| accepted, over max(1, largest |logit|) "
                        "(default 1e-3)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        export(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nstopped: {args.out} not written", file=sys.stderr)
        return 130
    return 0


class ExportMismatch(Exception):
    """onnxruntime's outputs differ from PyTorch's: nothing is written."""


def export(args) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        raise UserError(f"export needs the ONNX packages ({e.name} is missing): "
                        f"pip install -r requirements-export.txt") from None
    out = args.out
    if out.suffix.lower() != ".onnx" or out.is_dir():
        raise UserError(f"cannot write {out}: give the name of a .onnx file")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write {out}: {out.parent} is not a folder we can write into")
    model, checkpoint, path = checkpoints.load_trained_model(args.weights, args.net, args.att)
    diverged = checkpoints.non_finite_warning(model, path)
    if diverged:
        raise UserError(f"{diverged}; {out} not written")
    for module in model.modules():
        if isinstance(module, EMA):
            module.fused = False
    model.eval()
    saved = checkpoint["args"]
    mean, std = run_data.normalization_of(saved)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        write_onnx(model, tmp, args.opset)
        proto = onnx.load(str(tmp))
        metadata = {"net": saved["net"], "att": saved["att"],
                    "att_stages": saved.get("att_stages"),  # None: all
                    "classes": model_classes(model), "class_names": saved.get("class_names"),
                    "dataset": saved.get("dataset"),
                    "recipe": saved["recipe"], "epoch": checkpoint.get("epoch"),
                    "mean": list(mean), "std": list(std), "checkpoint": str(path.resolve())}
        onnx.helper.set_model_props(proto,
                                    {key: json.dumps(value) for key, value in metadata.items()})
        onnx.save(proto, str(tmp))
        difference = check_with_onnxruntime(model, tmp)
        if difference is not None and difference > args.tolerance:
            raise ExportMismatch(
                f"onnxruntime's logits differ from PyTorch's by up to {difference:.3g} of their "
                f"scale (more than --tolerance {args.tolerance:g}); {out} not written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(
        f"wrote {out}: {saved['net']} + {saved['att']} from {path} (input images: (batch, 3, 32, "
        f"32) normalized with mean {tuple(round(m, 4) for m in mean)}, std "
        f"{tuple(round(s, 4) for s in std)}; output logits: (batch, {model_classes(model)}))")
    if difference is None:
        print("not checked: onnxruntime is not installed (pip install onnxruntime)")
    else:
        print(
            f"checked with onnxruntime at batches {' and '.join(map(str, BATCHES))}: largest "
            f"|difference| in the logits {difference:.2g} of their scale")


def model_classes(model) -> int:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def write_onnx(model, path: Path, opset) -> None:
    """torch.onnx's exporter (torch.export based; the older TorchScript one cannot take EMA's
    GroupNorm, whose group count it reads as a tensor), the batch dimension left free."""
    example = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(path), input_names=["images"],
                              output_names=["logits"],
                              dynamo=True, dynamic_shapes=({0: batch},), opset_version=opset,
                              verbose=False,
                              external_data=False)  # one file, weights inside
        except Exception as e:
            raise UserError(f"torch.onnx could not export the model: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None


def check_with_onnxruntime(model, path: Path):
    """The largest |onnxruntime - PyTorch| over the logits of random batches of BATCHES, over
    max(1, the largest |logit|): float32's rounding grows with the logits (a diverged run's reach
    thousands); None where onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator, largest = torch.Generator().manual_seed(0), 0.0
    for batch in BATCHES:
        images = torch.randn(batch, 3, 32, 32, generator=generator)
        with torch.no_grad():
            expected = model(images)
        logits = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
        if logits.shape != expected.shape:
            raise ExportMismatch(
                f"onnxruntime's logits have shape {tuple(logits.shape)} at batch {batch}, "
                f"not {tuple(expected.shape)}")
        if not (torch.isfinite(logits).all() and torch.isfinite(expected).all()):
            # A NaN's difference is never above a tolerance: checked apart.
            raise ExportMismatch(f"the logits at batch {batch} are not all finite "
                                 f"(onnxruntime's or PyTorch's)")
        largest = max(largest,
                      ((logits - expected).abs().max() / expected.abs().max().clamp(min=1)).item())
    return largest


if __name__ == "__main__":
    sys.exit(main())
