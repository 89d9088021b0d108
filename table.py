"""Turn checkpoint/ into the paper's CIFAR-100 table: mean +/- std over seeds, beside the paper.

    python table.py                 # the table; results/table.md, curves.png and deltas.png
    python table.py --markdown      # print it as Markdown
    python table.py --delta 0.5     # the seeds line for a 0.5-point difference (default 0.3)

Reads every checkpoint/<net>_<att>/<run>/metrics.csv with the run's args.json (run_records.py). A
row holds the finished runs of one identity (everything that changes a result: training/options.py),
one per seed. Rows with the paper's configuration make the table; the others are listed apart,
labelled with what differs. Per row: final-epoch and best-epoch top-1/top-5 over the seeds (the
paper picks the best epoch on the test set; the final one is the honest number), and the difference
to the same net's baseline and EMA rows with a 95% Welch interval. Unfinished runs are listed apart,
with epochs done / planned, and never averaged in.
"""
import signal
import sys

if __name__ == "__main__":
    # Ctrl-C while the script still loads: one line, as later (main() handles it from there on).
    def stopped_while_loading(signum, frame):
        print("\nSIGINT: stopped", file=sys.stderr)
        sys.exit(130)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a job started with & ignores it
        signal.signal(signal.SIGINT, stopped_while_loading)

import argparse
import functools
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from conf import settings
from training.run_records import Identity, Run, in_paper_rows, label, read_runs

PAPER = {(net, att): (params, top1, top5) for net, att, params, top1, top5 in settings.PAPER_TABLE}
NAMES = {"none": "", "ema": "EMA", "se": "SE", "cbam": "CBAM", "eca": "ECA", "sa": "SA",
         "nam": "NAM", "ca": "CA"}

@dataclass
class Row:
    identity: Identity
    finished: list = field(default_factory=list)  # one run per seed
    unfinished: list = field(default_factory=list)
    # (run, the newer run of the same seed counted instead)
    duplicates: list = field(default_factory=list)

    @property
    def att(self) -> str:
        return self.identity.att

    @property
    def name(self) -> str:
        net = self.identity.net.replace("resnet", "ResNet")
        return f"{net} + {NAMES.get(self.att, self.att)}" if self.att != "none" else net

    @property
    def recipe_cell(self) -> str:
        """The recipe, then what differs from the paper, e.g. 'paper; amp=bf16'."""
        different = label(self.identity)
        return f"{self.identity.recipe}; {different}" if different else self.identity.recipe

    def values(self, which: str, key: str) -> list:
        """`key` at the final or the best epoch of each finished seed."""
        return [getattr(run, which)[key] for run in self.finished]

    def stats(self, which: str, key: str):
        """(mean, sample std or None, n) of `key` at the final or the best epoch of the finished
        runs."""
        values = self.values(which, key)
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std, len(values)


def group(runs: list[Run]) -> list[Row]:
    """One row per identity; a seed counts once (its newest finished run), never as two seeds."""
    rows = {}
    # newest first: the one counted
    for run in sorted(runs, key=lambda run: (-run.mtime, str(run.folder))):
        row = rows.setdefault(run.identity, Row(run.identity))
        if not run.finished:
            row.unfinished.append(run)
            continue
        counted = next((kept for kept in row.finished if kept.seed == run.seed), None)
        if counted:
            row.duplicates.append((run, counted))
        else:
            row.finished.append(run)
    order = {key: i for i, key in enumerate(PAPER)}  # the paper's rows first, in its order
    return sorted(rows.values(),
                  key=lambda r: (order.get((r.identity.net, r.att), len(order)), r.identity.net,
                                 r.att, r.identity.recipe, r.recipe_cell))


# ---------------------------------------------------------------- differences and their uncertainty

def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Numerical
    Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                     + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * beta_fraction(a, b, x) / a
    # I_x(a, b) = 1 - I_1-x(b, a), where the fraction converges
    return 1 - front * beta_fraction(b, a, 1 - x) / b


def beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by Lentz's method."""
    tiny = 1e-300  # keeps a zero denominator from dividing by zero
    c, d = 1.0, 1 / (1 - (a + b) * x / (a + 1) or tiny)
    result = d
    for m in range(1, 300):
        for term in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / (1 + term * d or tiny)
            c = 1 + term / c or tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return result


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for t >= 0, T Student's t with df (not necessarily whole) degrees of freedom."""
    return 1 - incomplete_beta(df / 2, 0.5, df / (df + t * t)) / 2


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t for p > 0.5, by bisection on its CDF."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(60):  # halves the bracket to below double precision
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


@dataclass
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def welch_interval(a: list, b: list, level: float = 0.95) -> Interval:
    """mean(a) - mean(b) with its Welch t interval (Welch-Satterthwaite degrees of freedom)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    mean = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:  # every seed gave the same number on both sides: nothing to widen
        return Interval(mean, mean, mean)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * math.sqrt(va + vb)
    return Interval(mean, mean - half, mean + half)


def compare(row: Row, reference, which: str, what: str):
    """row minus reference in top-1 at the final or the best epoch (an Interval), or what is missing
    for one."""
    if reference is None:
        return f"no {what} run"
    if len(row.finished) < 2:
        return f"needs >= 2 seeds (has {len(row.finished)})"
    if len(reference.finished) < 2:
        return f"needs >= 2 {what} seeds (has {len(reference.finished)})"
    return welch_interval(row.values(which, "test_top1"), reference.values(which, "test_top1"))


def interval_cell(result) -> str:
    if isinstance(result, str):
        return result
    mark = " *" if result.excludes_zero else ""
    return f"{result.mean:+.2f} [{result.low:+.2f}, {result.high:+.2f}]{mark}"


def pooled_std(rows: list[Row]):
    """(pooled sample std of final top-1 over the rows with >= 2 seeds, their number), or None."""
    finals = (row.values("final", "test_top1") for row in rows)
    spreads = [(len(v) - 1, statistics.variance(v)) for v in finals if len(v) >= 2]
    if not spreads:
        return None
    pooled = sum(dof * var for dof, var in spreads) / sum(dof for dof, _ in spreads)
    return math.sqrt(pooled), len(spreads)


def seeds_needed(std: float, delta: float) -> int:
    """The smallest n with t(0.975, 2n-2) * std * sqrt(2/n) <= delta: with n seeds on each side and
    this spread, an observed difference of delta has a 95% interval (two-sided, two-sample) that
    excludes zero. The left side only falls as n grows, so a doubling search then a bisection finds
    it."""
    too_few = lambda n: t_quantile(0.975, 2 * n - 2) * std * math.sqrt(2 / n) > delta
    low, high = 1, 2  # one seed gives no interval at all
    while too_few(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if too_few(middle) else (low, middle)
    return high


def seeds_line(rows: list[Row], delta: float) -> str:
    pooled = pooled_std(rows)
    if pooled is None:
        return (
            f"Seeds per row for a {delta:g}-point difference: unknown until a row of the table has "
            ">= 2 finished seeds.")
    std, n_rows = pooled
    return (f"Seeds per row to tell a {delta:g}-point difference at 95% (two-sided, two-sample): "
            f"{seeds_needed(std, delta)}, the smallest n with t(0.975, 2n-2) x s x sqrt(2/n) <= "
            f"{delta:g}, s = {std:.2f}: the pooled sample std of final top-1 over the {n_rows} "
            "row(s) with >= 2 seeds.")


# ---------------------------------------------------------------- the report

def known_models(runs: list[Run]) -> list[Run]:
    """The runs whose network and attention module this checkout has (a row's #Params comes from
    building it); the others, e.g. a branch's new module sharing checkpoint/, skipped with one
    line."""
    import models  # torch is only needed for the #Params column
    nets, attentions, known = models.list_models(), models.list_attentions(), []
    for run in runs:
        net, att = run.identity.net, run.identity.att
        unknown = ([f"network {net!r}"] if net not in nets else []) + (
            [f"attention module {att!r}"] if att not in attentions else [])
        if unknown:
            print(f"skipped {run.folder}: this checkout has no {' and no '.join(unknown)} "
                  f"(models/)", file=sys.stderr)
        else:
            known.append(run)
    return known


@functools.cache  # the table is rendered twice (printed, and table.md): build each model once
def count_params(net: str, att: str, att_stages=None, classes=settings.NUM_CLASSES) -> str:
    import models  # torch is only needed for this column
    model = models.model_of({"net": net, "att": att, "att_stages": att_stages, "classes": classes})
    return f"{models.count_parameters(model)[0] / 1e6:.2f}M"


def cell(mean, std):
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


HEADER = ["Name", "Recipe", "Resolution", "#Params", "Seeds", "Top-1 final", "Top-5 final",
          "Top-1 best", "Top-5 best", "Paper Top-1", "Δ best", "Paper Top-5", "Δ best"]
DIFF_HEADER = ["Name", "Recipe", "Seeds", "Δ final vs baseline", "Δ best vs baseline",
               "Δ final vs EMA",
               "Δ best vs EMA"]
TABLE_NOTE = (
    "Top-1/Top-5: test accuracy (%), mean ± sample standard deviation over seeds. 'best' is the "
    "epoch with the highest test top-1, as the paper picks it (on the test set: optimistic), or in "
    "rows with val=N the epoch with the highest validation top-1 (--val N: held-out training "
    "images); 'final' is the last epoch. Δ: our best-epoch mean minus the paper. Recipe: after "
    "';', what differs from the paper's configuration without changing the recipe (amp, sync_bn, b "
    "x world = 128, or the --data path of a run that did not record its dataset).")
DIFF_NOTE = (
    "Δ: mean top-1 over seeds minus that of the same net's baseline (or EMA) row of the same "
    "configuration, [95% Welch t interval over seeds]; * the interval excludes 0.")


def row_cells(row: Row) -> list[str]:
    """Name to Top-5 best."""
    columns = (("final", "test_top1"), ("best", "test_top1"), ("final", "test_top5"),
               ("best", "test_top5"))
    final1, best1, final5, best5 = (row.stats(which, key) for which, key in columns)
    params = count_params(row.identity.net, row.att, row.identity.att_stages,
                          (row.finished + row.unfinished)[0].classes)
    return [row.name, row.recipe_cell, "32x32", params, str(final1[2]),
            cell(*final1[:2]), cell(*final5[:2]), cell(*best1[:2]), cell(*best5[:2])]


def paper_cells(row: Row) -> list[str]:
    """row_cells, then the paper's figures and our best-epoch mean minus them."""
    _, paper1, paper5 = PAPER.get((row.identity.net, row.att), (None, None, None))
    best1, best5 = row.stats("best", "test_top1")[0], row.stats("best", "test_top5")[0]
    paper = lambda value: "" if value is None else f"{value:.2f}"
    delta = lambda ours, value: "" if value is None else f"{ours - value:+.2f}"
    return row_cells(row) + [paper(paper1), delta(best1, paper1), paper(paper5),
                             delta(best5, paper5)]


def difference_cells(row: Row, by_identity: dict) -> list[str]:
    cells = [row.name, row.recipe_cell, str(len(row.finished))]
    for att, what in (("none", "baseline"), ("ema", "EMA")):
        # The baseline has no module to place; EMA is compared at the same placement (--att-stages).
        reference = by_identity.get(
            row.identity._replace(att=att, att_stages=None if att == "none" else
                                  row.identity.att_stages))
        for which in ("final", "best"):
            cells.append(
                "-" if row.att == att else interval_cell(compare(row, reference, which, what)))
    return cells


def render(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        line = lambda cells: "| " + " | ".join(cells) + " |"
        return [line(header), "|" + "---|" * len(header)] + [line(r) for r in body]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    return [fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in body]


def sections(rows: list[Row]):
    """(the paper's rows, the other rows), each with finished runs."""
    counted = [row for row in rows if row.finished]
    return [r for r in counted if in_paper_rows(r.identity)], [
        r for r in counted if not in_paper_rows(r.identity)]


def differences_table(rows: list[Row], by_identity: dict, markdown: bool) -> list[str]:
    return ["", DIFF_NOTE, ""] + render(
        DIFF_HEADER, [difference_cells(row, by_identity) for row in rows], markdown)


def report_lines(rows: list[Row], delta: float, markdown: bool) -> list[str]:
    paper, other = sections(rows)
    by_identity = {row.identity: row for row in rows}
    lines = render(HEADER, [paper_cells(row) for row in paper], markdown)
    if not paper:
        lines.insert(0, "No finished runs with the paper's configuration yet.")
    lines += ["", TABLE_NOTE]
    if paper:
        lines += differences_table(paper, by_identity, markdown)
    lines += ["", seeds_line(paper, delta)]
    if other:
        lines += ["",
                  "Other configurations, never in the table above (Recipe: after ';', what "
                  "differs from the paper):", ""]
        lines += render(HEADER[:9], [row_cells(row) for row in other], markdown)
        lines += differences_table(other, by_identity, markdown)
    duplicates = [pair for row in rows for pair in row.duplicates]
    if duplicates:
        lines += ["",
                  "Duplicates (the same configuration and seed as a newer run, which counts "
                  "instead):"]
        lines += [f"- {run.folder}: seed {run.seed}, as {kept.folder}" for run, kept in duplicates]
    unfinished = [run for row in rows for run in row.unfinished]
    if unfinished:
        lines += ["", "Unfinished (not in the table):"]
        lines += [
            f"- {run.folder}: {len(run.rows)}/{run.identity.epochs} epochs"
            + ("" if (run.folder / "last.pth").exists() else " (no last.pth to resume)")
            for run in unfinished]
    return lines


# ---------------------------------------------------------------- pictures

def pyplot():
    """matplotlib.pyplot drawing to files only, or None: the table works without it."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(plt, rows: list[Row], path: Path) -> None:
    """Test top-1 against epoch, one line per row (mean over seeds) with its min/max band."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for row in rows:
        epochs = min(len(run.rows) for run in row.finished)
        curves = [[run.rows[e]["test_top1"] for run in row.finished] for e in range(epochs)]
        x = list(range(1, epochs + 1))
        line, = ax.plot(x, [statistics.fmean(c) for c in curves],
                        label=f"{row.name} ({row.recipe_cell}, {len(row.finished)} seeds)")
        ax.fill_between(x, [min(c) for c in curves], [max(c) for c in curves],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Test top-1: mean over seeds, band from min to max")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_deltas(plt, rows: list[Row], path: Path) -> None:
    """Forest plot: each row's final top-1 minus its baseline's, with the 95% Welch interval."""
    by_identity = {row.identity: row for row in rows}
    entries = []
    for row in rows:
        if row.att != "none":
            result = compare(row, by_identity.get(row.identity._replace(att="none")), "final",
                             "baseline")
            if isinstance(result, Interval):
                entries.append((f"{row.name} ({row.recipe_cell})", result))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * max(len(entries), 2)))
    for y, (_, result) in zip(range(len(entries), 0, -1), entries):  # the first row on top
        ax.errorbar([result.mean], [y],
                    xerr=[[result.mean - result.low], [result.high - result.mean]], fmt="o",
                    capsize=4, color="C3" if result.excludes_zero else "C0")
    ax.set_yticks(range(len(entries), 0, -1), [name for name, _ in entries])
    ax.set_ylim(0.5, max(len(entries), 1) + 0.5)
    if not entries:
        ax.text(0.5, 0.5, "no row and its baseline both have >= 2 finished seeds yet", ha="center",
                transform=ax.transAxes)
    ax.axvline(0, color="grey", linestyle="--")
    ax.set_xlabel("final test top-1 minus the baseline's (points)")
    ax.set_title("Difference to the baseline, 95% Welch interval over seeds (red: excludes 0)")
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint-dir", default=settings.CHECKPOINT_DIR)
    p.add_argument("--out", default="results",
                   help="folder for table.md, curves.png and deltas.png")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--delta", type=positive_number, default=0.3,
                   help="top-1 difference (points) for the seeds-needed line (default 0.3)")
    args = p.parse_args(argv)
    checkpoint_dir = Path(args.checkpoint_dir)
    if not checkpoint_dir.is_dir():
        print(
            f"error: no folder {checkpoint_dir}; train first (see README, 'Reproducing the table')",
            file=sys.stderr)
        return 2
    try:
        return report(checkpoint_dir, args)
    except KeyboardInterrupt:  # Ctrl-C while it reads or draws: one line, not a traceback
        print("\nSIGINT: stopped", file=sys.stderr)
        return 130


def report(checkpoint_dir: Path, args) -> int:
    """Print the table, then write table.md, curves.png and deltas.png; the exit code."""
    rows = group(known_models(read_runs(checkpoint_dir)))
    print("\n".join(report_lines(rows, args.delta, args.markdown)))
    out = Path(args.out)
    written = [out / "table.md"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text("\n".join(report_lines(rows, args.delta, markdown=True))
                                      + "\n")
        plt = pyplot()
        if plt is None:
            print(
                "curves.png and deltas.png skipped: matplotlib is not installed (pip install "
                "matplotlib)",
                file=sys.stderr)
        else:
            paper, other = sections(rows)
            plot_curves(plt, paper + other, out / "curves.png")
            plot_deltas(plt, paper + other, out / "deltas.png")
            written += [out / "curves.png", out / "deltas.png"]
    except OSError as e:
        print(f"error: cannot write to {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"\nwrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is stopped_while_loading:  # loaded: main() takes over
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
