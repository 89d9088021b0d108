"""Parameter and FLOP report for every row of the paper's CIFAR-100 table.

    python params.py

The paper counts parameters two ways without saying so: its baseline/CBAM/SA/ECA rows count every
parameter, its CA and EMA rows leave out every BatchNorm/GroupNorm affine parameter (SPEC.md section 4).
Both counts are shown, with the one that reproduces the paper's figure.
"""
from conf import settings
from models import create_model, list_attentions
from utils import count_mflops, count_parameters

NOTES = {
    "nam": "the paper counts the baseline: NAM's own BN (2C per block) is left out, the backbone's BN kept",
    "ssa": "no public definition of SSA exists; not built",
}


def matching_convention(paper_m: float, total: int, no_norm: int) -> str:
    matches = [name for name, count in (("all", total), ("no-norm", no_norm))
               if round(count / 1e6, 2) == paper_m]
    return " & ".join(matches) or "none"


def report_rows():
    """One dict per row of the paper's table; unbuildable rows carry None counts."""
    for net, attention, paper_m, _, _ in settings.PAPER_TABLE:
        row = dict(net=net, attention=attention, paper_m=paper_m, note=NOTES.get(attention, ""),
                   total=None, no_norm=None, mflops=None, match="none")
        if attention in list_attentions():
            model = create_model(net, attention, settings.NUM_CLASSES)
            row["total"], row["no_norm"] = count_parameters(model)
            row["mflops"] = count_mflops(model)
            row["match"] = matching_convention(paper_m, row["total"], row["no_norm"])
        yield row


def main():
    header = f"{'row':<22}{'all params':>13}{'no-norm params':>16}{'paper':>9}  {'matches':<9}{'MFLOPs':>9}"
    print(header)
    print("-" * len(header))
    for row in report_rows():
        name = row["net"] if row["attention"] == "none" else f"{row['net']} + {row['attention']}"
        if row["total"] is None:
            counts = f"{'-':>13}{'-':>16}"
            mflops = f"{'-':>9}"
        else:
            counts = f"{row['total']:>13,}{row['no_norm']:>16,}"
            mflops = f"{row['mflops']:>9.1f}"
        print(f"{name:<22}{counts}{row['paper_m']:>8.2f}M  {row['match']:<9}{mflops}"
              + (f"  ({row['note']})" if row["note"] else ""))
    print("\nall: every parameter; no-norm: BatchNorm/GroupNorm affine parameters left out; "
          "MFLOPs: forward, one 32x32 image, torch.utils.flop_counter (convs and matmuls, 2 per multiply-add).")


if __name__ == "__main__":
    main()
