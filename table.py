"""Turn checkpoint/ into the paper's CIFAR-100 table: mean +/- std over seeds, beside the paper.

    python table.py                 # print the table, write results/table.md and results/curves.png
    python table.py --markdown      # print it as Markdown

Reads every checkpoint/<net>_<att>/<run>/metrics.csv with the run's args.json. One row per
net x attention x recipe: final-epoch and best-epoch top-1/top-5 over the finished runs (the paper
picks the best epoch on the test set; the final one is the honest number). Unfinished runs are
listed apart, with epochs done / planned, and never averaged in.
"""
import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conf import settings

PAPER = {(net, att): (params, top1, top5) for net, att, params, top1, top5 in settings.PAPER_TABLE}
NAMES = {"none": "", "ema": "EMA", "se": "SE", "cbam": "CBAM", "eca": "ECA", "sa": "SA", "nam": "NAM", "ca": "CA"}


@dataclass
class Run:
    folder: Path
    net: str
    att: str
    recipe: str
    seed: int
    planned: int
    rows: list  # metrics.csv, one dict of floats per epoch

    @property
    def finished(self) -> bool:
        return len(self.rows) >= self.planned

    @property
    def final(self) -> dict:
        return self.rows[-1]

    @property
    def best(self) -> dict:
        return max(self.rows, key=lambda r: r["test_top1"])  # the first epoch with the highest top-1


@dataclass
class Row:
    net: str
    att: str
    recipe: str
    finished: list = field(default_factory=list)
    unfinished: list = field(default_factory=list)

    @property
    def name(self) -> str:
        net = self.net.replace("resnet", "ResNet")
        return f"{net} + {NAMES.get(self.att, self.att)}" if self.att != "none" else net

    def stats(self, which: str, key: str):
        """(mean, sample std or None, n) of `key` at the final or the best epoch of the finished runs."""
        values = [getattr(run, which)[key] for run in self.finished]
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std, len(values)


def run_args(folder: Path):
    """The run's arguments: args.json, or for runs older than it, those inside last.pth."""
    if (folder / "args.json").is_file():
        return json.loads((folder / "args.json").read_text())
    if (folder / "last.pth").is_file():
        from utils import load_checkpoint  # torch is only needed for this fallback
        return load_checkpoint(folder / "last.pth")["args"]
    return None


def read_runs(checkpoint_dir: Path) -> list[Run]:
    runs = []
    for metrics in sorted(checkpoint_dir.glob("*/*/metrics.csv")):
        args = run_args(metrics.parent)
        if args is None:
            print(f"skipped {metrics.parent}: neither args.json nor last.pth", file=sys.stderr)
            continue
        with open(metrics) as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        if rows:
            runs.append(Run(metrics.parent, args["net"], args["att"], args["recipe"], args["seed"],
                            args["epochs"], rows))
    return runs


def group(runs: list[Run]) -> list[Row]:
    rows = {}
    for run in runs:
        row = rows.setdefault((run.net, run.att, run.recipe), Row(run.net, run.att, run.recipe))
        (row.finished if run.finished else row.unfinished).append(run)
    order = {key: i for i, key in enumerate(PAPER)}  # the paper's rows first, in its order
    return sorted(rows.values(), key=lambda r: (order.get((r.net, r.att), len(order)), r.net, r.att, r.recipe))


def count_params(net: str, att: str) -> str:
    import models  # torch is only needed for this column
    from utils import count_parameters
    return f"{count_parameters(models.create_model(net, att, settings.NUM_CLASSES))[0] / 1e6:.2f}M"


def cell(mean, std):
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


HEADER = ["Name", "Recipe", "Resolution", "#Params", "Seeds", "Top-1 final", "Top-5 final",
          "Top-1 best", "Top-5 best", "Paper Top-1", "Δ best", "Paper Top-5", "Δ best"]


def table_body(rows: list[Row]) -> list[list[str]]:
    """The cells of every row with finished runs."""
    body = []
    for row in rows:
        if not row.finished:
            continue
        params = count_params(row.net, row.att)
        final1, best1, final5, best5 = (row.stats(w, k) for w, k in (("final", "test_top1"), ("best", "test_top1"),
                                                                     ("final", "test_top5"), ("best", "test_top5")))
        _, paper1, paper5 = PAPER.get((row.net, row.att), (None, None, None))
        delta = lambda ours, paper: "" if paper is None else f"{ours - paper:+.2f}"
        body.append([row.name, row.recipe, "32x32", params, str(final1[2]), cell(*final1[:2]), cell(*final5[:2]),
                     cell(*best1[:2]), cell(*best5[:2]), "" if paper1 is None else f"{paper1:.2f}",
                     delta(best1[0], paper1), "" if paper5 is None else f"{paper5:.2f}", delta(best5[0], paper5)])
    return body


def table_lines(rows: list[Row], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
    else:
        widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(HEADER)]
        fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
        lines = [fmt(HEADER), "-" * len(fmt(HEADER))] + [fmt(r) for r in body]
    unfinished = [run for row in rows for run in row.unfinished]
    if unfinished:
        lines += ["", "Unfinished (not in the table):"]
        lines += [f"- {run.folder}: {len(run.rows)}/{run.planned} epochs" for run in unfinished]
    if not body:
        lines.insert(0, "No finished runs yet.")
    lines += ["", "Top-1/Top-5: test accuracy (%), mean ± sample standard deviation over seeds. "
              "'best' is the epoch with the highest test top-1, as the paper picks it (on the test set: "
              "optimistic); 'final' is the last epoch. Δ: our best-epoch mean minus the paper."]
    return lines


def plot_curves(rows: list[Row], path: Path) -> bool:
    """Test top-1 against epoch, one line per row (mean over seeds) with its min/max band."""
    try:
        import matplotlib
    except ImportError:
        print("curves skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for row in rows:
        if not row.finished:
            continue
        epochs = min(len(run.rows) for run in row.finished)
        curves = [[run.rows[e]["test_top1"] for run in row.finished] for e in range(epochs)]
        x = list(range(1, epochs + 1))
        line, = ax.plot(x, [statistics.fmean(c) for c in curves],
                        label=f"{row.name} ({row.recipe}, {len(row.finished)} seeds)")
        ax.fill_between(x, [min(c) for c in curves], [max(c) for c in curves], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("CIFAR-100: mean over seeds, band from min to max")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint-dir", default=settings.CHECKPOINT_DIR)
    p.add_argument("--out", default="results", help="folder for table.md and curves.png")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    checkpoint_dir = Path(args.checkpoint_dir)
    if not checkpoint_dir.is_dir():
        print(f"error: no folder {checkpoint_dir}; train first (see README, 'Reproducing the table')",
              file=sys.stderr)
        return 2
    rows = group(read_runs(checkpoint_dir))
    body = table_body(rows)
    print("\n".join(table_lines(rows, body, args.markdown)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(table_lines(rows, body, markdown=True)) + "\n")
    written = [out / "table.md"]
    if plot_curves(rows, out / "curves.png"):
        written.append(out / "curves.png")
    print(f"\nwrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
