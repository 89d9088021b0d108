"""Grad-CAM of a trained checkpoint on its dataset's test images, as one PNG grid.

    python gradcam.py -net resnet50 -att ema -weights checkpoint/resnet50_ema/<run>/best.pth \
        --images 16

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017: the last stage's feature maps, weighted by the spatial mean of the
predicted class's gradient with respect to them, summed, ReLU, upsampled to the image. Our own
hooks; no extra package. Each cell of the grid: the image, its heat-map overlay, the true and the
predicted class.
"""
import argparse
import os
import sys
from pathlib import Path

from PIL import Image

import utils
from training import checkpoints, cli, loaders, pictures, run_data
from utils import UserError


def check_out(out: Path) -> None:
    """Refuse, before any work, a file name PIL has no writer for or a folder we cannot write
    into."""
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise UserError(
            f"cannot write {out}: PIL writes no image format with that extension (use .png)")
    folder = out.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {out}: {folder} is not a folder we can write into")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    cli.add_model(p)
    cli.add_weights(p)
    p.add_argument("--images", type=int, default=16, help="how many test images (the first ones)")
    p.add_argument("--out", type=Path, default=Path("gradcam.png"))
    p.add_argument("--columns", type=int, default=4)
    cli.add_data(p, default=None, whose="the folder the checkpoint was trained on")
    args = p.parse_args(argv)
    if args.images < 1 or args.columns < 1:
        p.error("--images and --columns must be at least 1")
    try:
        check_out(args.out)
        model, checkpoint, path = checkpoints.load_trained_model(args.weights, args.net, args.att)
        dataset = run_data.trained_on(checkpoint["args"], args.data)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    diverged = checkpoints.non_finite_warning(model, path)
    if diverged:
        print(f"warning: {diverged}; its maps mean nothing", file=sys.stderr)
    device = utils.default_device()
    model.to(device).eval()
    recipe = run_data.recipe_of(checkpoint["args"])
    loader = loaders.make_loader("device", dataset, args.images, recipe, device, train=False)
    images, labels = next(iter(loader))
    cams, predicted = pictures.grad_cam(model, images)
    names = dataset.classes
    captions = [f"true: {names[t]}\npred: {names[p]}"
                for t, p in zip(labels.tolist(), predicted.tolist())]
    grid = pictures.draw_grid(pictures.unnormalize(images, recipe).cpu(), cams.cpu(), captions,
                              min(args.columns, len(captions)))
    try:
        grid.save(args.out)
    except OSError as e:  # checked before the work, but the folder can change meanwhile
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    net, att = checkpoint["args"]["net"], checkpoint["args"]["att"]
    epoch = "" if checkpoint["epoch"] is None else f", epoch {checkpoint['epoch']}"
    print(f"{args.out}: Grad-CAM of {net} + {att} ({path}{epoch}) on {len(captions)} test images")
    print(f"checkpoint layout: {checkpoint['layout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
