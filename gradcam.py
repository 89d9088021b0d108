"""Grad-CAM of a trained checkpoint on CIFAR-100 test images, as one PNG grid.

    python gradcam.py -net resnet50 -att ema -weights checkpoint/resnet50_ema/<run>/best.pth --images 16

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
ICCV 2017: the last stage's feature maps, weighted by the spatial mean of the predicted class's
gradient with respect to them, summed, ReLU, upsampled to the image. Our own hooks; no extra package.
Each cell of the grid: the image, its heat-map overlay, the true and the predicted class.
"""
import argparse
import sys

import torch
from PIL import Image, ImageDraw
from torch import nn

import cifar
import models
import utils
from conf import settings
from utils import UserError

SCALE = 4  # 32x32 images drawn at 128x128
CAPTION = 28  # pixels under each cell for the two class names
GAP = 8  # pixels between cells


def grad_cam(model: nn.Module, images: torch.Tensor):
    """(maps in [0, 1] of the images' size (B, H, W), predicted classes (B,)) for an eval-mode model."""
    target = list(models.stage_ends(model).values())[-1]
    seen = {}

    def keep(module, inputs, output):
        seen["activation"] = output
        output.register_hook(lambda grad: seen.__setitem__("gradient", grad))

    handle = target.register_forward_hook(keep)
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(images)
            predicted = logits.argmax(1)
            # The images are independent in eval mode: one backward gives every image its gradient.
            logits.gather(1, predicted[:, None]).sum().backward()
    finally:
        handle.remove()
    activation, gradient = seen["activation"].detach(), seen["gradient"]
    cam = (gradient.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True).relu()
    cam = nn.functional.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-12), predicted


def to_pil(rgb: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> a PIL image SCALE times larger (nearest: the pixels stay visible)."""
    array = (rgb.permute(1, 2, 0) * 255).round().byte().cpu().numpy()
    image = Image.fromarray(array)
    return image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)


def draw_grid(pictures: torch.Tensor, cams: torch.Tensor, captions: list, columns: int) -> Image.Image:
    """A grid of cells [image | overlay] with two caption lines under each."""
    side = pictures.shape[-1] * SCALE
    cell_w, cell_h = 2 * side + GAP, side + CAPTION
    rows = -(-len(captions) // columns)
    grid = Image.new("RGB", (columns * cell_w - GAP, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    overlays = 0.5 * pictures + 0.5 * utils.colorize(cams)
    for i, (picture, overlay, caption) in enumerate(zip(pictures, overlays, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(to_pil(picture), (x, y))
        grid.paste(to_pil(overlay), (x + side, y))
        draw.multiline_text((x + 4, y + side + 2), caption, fill="black", spacing=2)
    return grid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("-net", choices=models.list_models(), default=None, help="default: the checkpoint's")
    p.add_argument("-att", choices=models.list_attentions(), default=None, help="default: the checkpoint's")
    p.add_argument("-weights", "--weights", required=True, help="a checkpoint file, or a run folder (its last.pth)")
    p.add_argument("--images", type=int, default=16, help="how many test images (the first ones)")
    p.add_argument("--out", default="gradcam.png")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--data", default=settings.DATA_DIR)
    args = p.parse_args(argv)
    if args.images < 1 or args.columns < 1:
        p.error("--images and --columns must be at least 1")
    try:
        model, checkpoint, path = utils.load_trained_model(args.weights, args.net, args.att)
        cifar.ensure_cifar100(args.data)
        dataset = cifar.CIFAR100Folder(args.data, train=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = utils.default_device()
    model.to(device).eval()
    recipe = settings.RECIPES[checkpoint["args"]["recipe"]]
    loader = cifar.make_loader("device", dataset, args.images, recipe, device, train=False)
    images, labels = next(iter(loader))
    cams, predicted = grad_cam(model, images)
    names = dataset.classes
    captions = [f"true: {names[t]}\npred: {names[p]}" for t, p in zip(labels.tolist(), predicted.tolist())]
    grid = draw_grid(utils.unnormalize(images, recipe).cpu(), cams.cpu(), captions, min(args.columns, len(captions)))
    try:
        grid.save(args.out)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    net, att = checkpoint["args"]["net"], checkpoint["args"]["att"]
    epoch = "" if checkpoint["epoch"] is None else f", epoch {checkpoint['epoch']}"
    print(f"{args.out}: Grad-CAM of {net} + {att} ({path}{epoch}) on {len(captions)} test images")
    print(f"checkpoint layout: {checkpoint['layout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
