"""Evaluate a checkpoint on its dataset's test set: top-1/top-5 error, parameters and MFLOPs.

    python test.py -net resnet50 -att ema -weights checkpoint/resnet50_ema/<run>/best.pth
    python test.py -weights checkpoint/resnet50_ema/<run>      # a run folder: its last.pth

-net and -att default to the checkpoint's own; given, they must match it. A checkpoint of the NAM
authors' or the classic CIFAR-100 repo's training script (checkpoints.py) records neither:
give both.
"""
import argparse
import sys

import models
import utils
from training import checkpoints, cli, engine, loaders, run_data
from training.speed import SpeedSettings
from utils import UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    cli.add_model(p)
    cli.add_weights(p)
    p.add_argument("-b", "--b", "--batch-size", dest="b", type=cli.positive(int), default=256,
                   help="test batch size (default 256)")
    cli.add_data(p, default=None, whose="the folder the checkpoint was trained on")
    cli.add_amp(p)
    return p


def parse_args(argv=None):
    p = parser()
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        test(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def test(args):
    model, checkpoint, path = checkpoints.load_trained_model(args.weights, args.net, args.att)
    saved = checkpoint["args"]
    net, att = saved["net"], saved["att"]
    diverged = checkpoints.non_finite_warning(model, path)
    if diverged:
        print(f"warning: {diverged}; its scores below mean nothing", file=sys.stderr)
    # One pass over the test set: compiling would cost more time than it saves.
    speed = SpeedSettings.resolve(utils.default_device(), amp=args.amp, compile=False)
    model.to(speed.device, memory_format=speed.memory_format)
    dataset = run_data.trained_on(saved, args.data)
    loader = loaders.make_loader("device", dataset, args.b, run_data.recipe_of(saved), speed.device,
                                 train=False)
    stats = engine.evaluate(model, loader, speed)
    total, no_norm = models.count_parameters(model)
    mflops = models.count_mflops(model)

    n = checkpoint["epoch"]
    epochs = "" if n is None else f", after {n} epoch{'s' if n != 1 else ''}"
    stages = f" in stages {saved['att_stages']}" if saved.get("att_stages") else ""
    print(
        f"{path}: {net} + {att}{stages}, recipe {saved['recipe']}{epochs}, {len(loader.dataset):,} "
        "test images")
    print(f"checkpoint layout: {checkpoint['layout']}")
    print(f"top-1 error {100 - stats['top1']:.2f}%  top-5 error {100 - stats['top5']:.2f}%  "
          f"(top-1 {stats['top1']:.2f}%, top-5 {stats['top5']:.2f}%, loss {stats['loss']:.4f})")
    print(f"parameters {total:,} (all), {no_norm:,} (without BatchNorm/GroupNorm); "
          f"{mflops:.1f} MFLOPs per 32x32 image" + executed_note(model, mflops))
    return stats


def executed_note(model, counted: float) -> str:
    """Beside the MFLOPs `counted` as the paper counts them (EMA as its authors compute it), once,
    what this repo's EMA runs: its 3x3 branch by algebra (docs/reference.md, 2.2 EMA)."""
    executed = models.count_mflops(model, executed=True)
    if executed == counted:
        return ""
    return f" (EMA as its authors compute it; this repo's EMA runs {executed:.1f})"


if __name__ == "__main__":
    sys.exit(main())
