"""Pictures of what a network looks at: Grad-CAM maps, EMA's spatial gates, and the grids that show
them."""
import torch
import torchvision
from PIL import Image, ImageDraw
from torch import nn

import models
from models.attention import EMA

SCALE = 4  # 32x32 images drawn at 128x128
CAPTION = 28  # pixels under each cell for the two class names
GAP = 8  # pixels between cells


def colorize(maps: torch.Tensor) -> torch.Tensor:
    """Maps in [0, 1], (..., H, W) -> RGB in [0, 1], (..., 3, H, W), with a jet-like colour
    scale."""
    levels = maps.unsqueeze(-3) * 4
    # red, green, blue peaks
    centres = torch.tensor([3.0, 2.0, 1.0], device=maps.device).view(3, 1, 1)
    return (1.5 - (levels - centres).abs()).clamp(0, 1)


def unnormalize(images: torch.Tensor, recipe: dict) -> torch.Tensor:
    """Normalized images -> RGB in [0, 1]."""
    mean = torch.tensor(recipe["mean"], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(recipe["std"], device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def grad_cam(model: nn.Module, images: torch.Tensor):
    """(maps in [0, 1] of the images' size (B, H, W), predicted classes (B,)) for an eval-mode
    model.

    Selvaraju et al., ICCV 2017: the last stage's feature maps, weighted by the spatial mean of the
    predicted class's gradient with respect to them, summed, ReLU, upsampled to the image. The
    model's hooks and parameter gradients are left as they were."""
    activation, gradient, predicted = last_stage_output_and_gradient(model, images)
    cam = (gradient.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True).relu()
    cam = nn.functional.interpolate(cam, size=images.shape[2:], mode="bilinear",
                                    align_corners=False)[:, 0]
    low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-12), predicted


def last_stage_output_and_gradient(model: nn.Module, images: torch.Tensor):
    """(the last stage's output, the gradient of each image's predicted logit with respect to it,
    the predicted classes), the output detached: nothing returned holds the graph.

    torch.autograd.grad rather than a hook on the output: that hook's closure would hold the output,
    whose graph holds the hook, a cycle through autograd's C++ side that Python's garbage collector
    cannot see, keeping every call's graph alive (330 MB a call on ResNet101). autograd.grad also
    leaves the parameters' .grad alone."""
    outputs = []
    handle = list(models.stage_ends(model).values())[-1].register_forward_hook(
        lambda module, inputs, output: outputs.append(output))
    try:
        with torch.enable_grad():
            logits = model(images)
    finally:
        handle.remove()
    predicted = logits.argmax(1)
    # The images are independent in eval mode: one gradient of the sum gives every image its own.
    gradient, = torch.autograd.grad(logits.gather(1, predicted[:, None]).sum(), outputs[0])
    return outputs[0].detach(), gradient, predicted


@torch.no_grad()
def ema_gate_grids(model: nn.Module, images: torch.Tensor, recipe: dict, speed) -> dict:
    """For the last block of each stage that has an EMA: a grid of [image | EMA's spatial gate
    (sigmoid of its cross-spatial weights, mean over the groups, upsampled to the image)], (3, H, W)
    in [0, 1], by stage name. Empty for a model without EMA."""
    gates, handles = {}, []
    for name, block in models.stage_ends(model).items():
        ema = next((m for m in block.modules() if isinstance(m, EMA)), None)
        if ema is not None:
            store = lambda module, inputs, output, name=name: gates.__setitem__(
                name, module.spatial_gate(inputs[0]))
            handles.append(ema.register_forward_hook(store))
    # a DataLoader's test images are on the CPU, the model may not be
    images = images.to(speed.device)
    was_training = model.training
    model.eval()
    try:
        with speed.autocast():
            model(speed.inputs(images))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    pictures = unnormalize(images, recipe)
    grids = {}
    for name, gate in gates.items():
        gate = nn.functional.interpolate(gate.float().mean(1, keepdim=True), size=images.shape[2:],
                                         mode="nearest")
        cells = torch.cat([pictures, colorize(gate[:, 0])], dim=3)  # image and gate side by side
        grids[name] = torchvision.utils.make_grid(cells, nrow=4, padding=2, pad_value=1)
    return grids


def to_pil(rgb: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> a PIL image SCALE times larger (nearest: the pixels stay visible)."""
    array = (rgb.permute(1, 2, 0) * 255).round().byte().cpu().numpy()
    image = Image.fromarray(array)
    return image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)


def draw_grid(pictures: torch.Tensor, cams: torch.Tensor, captions: list,
              columns: int) -> Image.Image:
    """A grid of cells [image | heat-map overlay] with two caption lines under each."""
    side = pictures.shape[-1] * SCALE
    cell_w, cell_h = 2 * side + GAP, side + CAPTION
    rows = -(-len(captions) // columns)
    grid = Image.new("RGB", (columns * cell_w - GAP, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    overlays = 0.5 * pictures + 0.5 * colorize(cams)
    for i, (picture, overlay, caption) in enumerate(zip(pictures, overlays, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(to_pil(picture), (x, y))
        grid.paste(to_pil(overlay), (x + side, y))
        draw.multiline_text((x + 4, y + side + 2), caption, fill="black", spacing=2)
    return grid
