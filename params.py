"""Parameter and FLOP report for every row of the paper's CIFAR-100 table, and its MobileNetV2 rows.

    python params.py
    python params.py --att-stages 3,4   # the modules in stages 3 and 4 only: a placement ablation

The paper counts parameters two ways without saying so: its baseline/CBAM/SA/ECA rows count every
parameter, its CA and EMA rows leave out every BatchNorm/GroupNorm affine parameter
(docs/reference.md section 4). Both counts are shown, with the one that reproduces the paper's
figure.
"""
import argparse

from conf import settings
from models import (ALL_STAGES, count_mflops, count_parameters, create_model, list_attentions,
                    parse_stages)
from models.attention import ATTENTIONS, EMA
from models.mobilenetv2 import MobileNetV2
from training import cli

NOTES = {
    "nam": "the paper counts the baseline: NAM's own BN (2C per block) is left out, the backbone's "
           "BN kept",
    "ssa": "no public definition of SSA exists; not built",
}


def matching_convention(paper_m: float, total: int, no_norm: int) -> str:
    matches = [name for name, count in (("all", total), ("no-norm", no_norm))
               if round(count / 1e6, 2) == paper_m]
    return " & ".join(matches) or "none"


def report_rows(stages=ALL_STAGES):
    """One dict per row of the paper's table, the modules in the blocks of `stages`; unbuildable
    rows carry None counts."""
    for net, attention, paper_m, _, _ in settings.PAPER_TABLE:
        row = dict(net=net, attention=attention, paper_m=paper_m, note=NOTES.get(attention, ""),
                   total=None, no_norm=None, mflops=None, executed=None, match="none")
        if attention in list_attentions():
            model = create_model(net, attention, settings.NUM_CLASSES,
                                 stages if attention != "none" else ALL_STAGES)
            row["total"], row["no_norm"] = count_parameters(model)
            row["mflops"] = count_mflops(model)
            row["executed"] = count_mflops(model, executed=True)
            row["match"] = matching_convention(paper_m, row["total"], row["no_norm"])
        yield row


def imagenet_rows():
    """The paper's MobileNetV2 rows, ImageNet-shaped (224x224, 1000 classes). MMACs: multiply-adds,
    the unit of the paper's "MFLOPs"."""
    baseline_mmacs = None
    for net, attention, paper_m, paper_mmacs in settings.PAPER_IMAGENET:
        model = MobileNetV2(1000, ATTENTIONS.get(attention), cifar=False)
        total, no_norm = count_parameters(model)
        mmacs = count_mflops(model, image_size=224) / 2
        row = dict(net=net, attention=attention, total=total, no_norm=no_norm, paper_m=paper_m,
                   mmacs=mmacs,
                   paper_mmacs=paper_mmacs, match=matching_convention(paper_m, total, no_norm),
                   note="")
        if attention == "none":
            baseline_mmacs = mmacs
        elif attention == "ema" and baseline_mmacs is not None:
            # The authors' EMA folds its G groups into the batch; counted for one group only (as a
            # per-sample counter dividing by that batch would), its cost is 1/G.
            groups = next(m.groups for m in model.modules() if isinstance(m, EMA))
            one_group = baseline_mmacs + (mmacs - baseline_mmacs) / groups
            row["note"] = (f"EMA's convolutions over all {groups} groups; counted for one group "
                           "(as a per-sample counter that divides by EMA's own batch would): "
                           f"{one_group:.1f}")
        yield row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_option(p, "att_stages")
    stages = parse_stages(p.parse_args(argv).att_stages)
    if stages != ALL_STAGES:
        print(
            f"The modules in the blocks of stage(s) {', '.join(map(str, stages))} only: the "
            f"paper's figures count all four. The MobileNetV2 rows keep their own placement.\n")
    header = (f"{'row':<22}{'all params':>13}{'no-norm params':>16}{'paper':>9}  {'matches':<9}"
              f"{'MFLOPs':>9}")
    print(header)
    print("-" * len(header))
    executed = {}
    for row in report_rows(stages):
        name = row["net"] if row["attention"] == "none" else f"{row['net']} + {row['attention']}"
        if row["total"] is None:
            counts = f"{'-':>13}{'-':>16}"
            mflops = f"{'-':>9}"
        else:
            counts = f"{row['total']:>13,}{row['no_norm']:>16,}"
            mflops = f"{row['mflops']:>9.1f}"
            if row["executed"] != row["mflops"]:
                executed[name] = row["executed"]
        print(f"{name:<22}{counts}{row['paper_m']:>8.2f}M  {row['match']:<9}{mflops}"
              + (f"  ({row['note']})" if row["note"] else ""))
    print("\nall: every parameter; no-norm: BatchNorm/GroupNorm affine parameters left out; "
          "MFLOPs: forward, one 32x32 image, torch.utils.flop_counter (convs and matmuls, 2 per "
          "multiply-add).")
    if executed:
        print(
            "EMA's MFLOPs as its authors' code computes it, comparable with the paper's; this "
            "repo's EMA computes its 3x3 branch by algebra (docs/reference.md, 2.2 EMA) and runs "
            + ", ".join(f"{mflops:.1f} ({name})" for name, mflops in executed.items()) + ".")

    header = (f"{'ImageNet row':<22}{'all params':>13}{'no-norm params':>16}{'paper':>9}  "
              f"{'matches':<9}{'MMACs':>8}{'paper':>7}")
    print(f"\n{header}\n{'-' * len(header)}")
    for row in imagenet_rows():
        name = row["net"] if row["attention"] == "none" else f"{row['net']} + {row['attention']}"
        print(
            f"{name:<22}{row['total']:>13,}{row['no_norm']:>16,}{row['paper_m']:>8.2f}M  "
            f"{row['match']:<9}{row['mmacs']:>8.1f}{row['paper_mmacs']:>7}"
            + (f"  ({row['note']})" if row["note"] else ""))
    print("\nMMACs: forward multiply-adds for one 224x224 image (torch.utils.flop_counter / 2), "
          "the unit of the paper's MobileNetV2 'MFLOPs'.")


if __name__ == "__main__":
    main()
