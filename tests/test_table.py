"""table.py on fake run folders, and reproduce.py's commands."""
import csv
import json
import math
import os
import statistics
import sys

import pytest
from PIL import Image

from conf import settings
from training import run_records

import table

FIELDS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
          "seconds"]
# Student's t 0.975-quantiles from printed tables, by degrees of freedom.
T975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 8: 2.306004, 10: 2.228139, 30: 2.042272}


def fake_run(root, net, att, seed, top1s, planned, recipe="paper", run=None, **args):
    """A run folder as train_cifar100.py leaves it; `args` adds to (or replaces) the arguments in
    args.json."""
    folder = root / f"{net}_{att}" / (run or f"{recipe}-seed{seed}")
    folder.mkdir(parents=True)
    if args.get("subset") and "subset_draw" not in args:  # what the trainer records with it
        args["subset_draw"] = "stratified"
    (folder / "args.json").write_text(json.dumps({"net": net, "att": att, "recipe": recipe,
                                                  "seed": seed,
                                                  "epochs": planned, **args}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for epoch, top1 in enumerate(top1s, 1):
            writer.writerow({"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_top1": 50,
                             "test_loss": 1.5,
                             "test_top1": top1, "test_top5": top1 + 15, "seconds": 3})
    (folder / "last.pth").write_bytes(b"placeholder")
    return folder


def paper_run(root, att, seed, final, best=None, net="resnet50", **args):
    """A finished 200-epoch run of the paper's configuration with the given final and best top-1."""
    best = final if best is None else best
    return fake_run(root, net, att, seed, [best - 10] * 198 + [best, final],
                    planned=settings.EPOCHS, **args)


def padded(top1s):
    """The last epochs of a 200-epoch curve; the earlier ones are lower."""
    return [30.0] * (settings.EPOCHS - len(top1s)) + top1s


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "checkpoint"
    # seed: last test top-1s
    ema = {0: [40.0, 79.0, 78.5], 1: [42.0, 80.5, 80.25], 2: [41.0, 77.0, 81.0]}
    for seed, top1s in ema.items():
        fake_run(root, "resnet50", "ema", seed, padded(top1s), planned=settings.EPOCHS)
    # unfinished: must not count
    fake_run(root, "resnet50", "ema", 3, [45.0], planned=settings.EPOCHS)
    fake_run(root, "resnet50", "none", 0, padded([30.0, 70.0, 77.5]), planned=settings.EPOCHS)
    return root, ema


def cells(out: str, name: str, after: str = "") -> list[str]:
    """The cells of the first Markdown row named `name` below the line starting with `after`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after)) if after else 0
    line = next(line for line in lines[start:] if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def markdown(root, tmp_path, capsys, *flags):
    assert table.main(["--checkpoint-dir", str(root), "--out", str(tmp_path / "results"),
                       "--markdown", *flags]) == 0
    return capsys.readouterr()


def test_table_means_stds_counts_and_paper(runs, tmp_path, capsys):
    root, ema = runs
    out = markdown(root, tmp_path, capsys).out
    row = dict(zip(table.HEADER[:9], cells(out, "ResNet50 + EMA")))
    finals = [v[-1] for v in ema.values()]
    bests = [max(v) for v in ema.values()]
    assert row["Seeds"] == "3" and row["Recipe"] == "paper" and row["Resolution"] == "32x32"
    assert row["#Params"] == "23.90M"
    assert row["Top-1 final"] == f"{statistics.fmean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert row["Top-1 best"] == f"{statistics.fmean(bests):.2f} ± {statistics.stdev(bests):.2f}"
    assert row[
        "Top-5 best"] == f"{statistics.fmean(bests) + 15:.2f} ± {statistics.stdev(bests):.2f}"
    paper_top1 = 80.69
    ema_cells = cells(out, "ResNet50 + EMA")
    assert ema_cells[9] == f"{paper_top1:.2f}" and ema_cells[
        10] == f"{statistics.fmean(bests) - paper_top1:+.2f}"
    baseline = cells(out, "ResNet50")
    # one seed: no ± part
    assert baseline[4] == "1" and baseline[5] == "77.50" and baseline[9] == "77.26"
    # The unfinished run is listed apart with its progress, never averaged in.
    assert "Unfinished (not in the table):" in out and "paper-seed3: 1/200 epochs" in out
    assert out.index("| ResNet50 |") < out.index("| ResNet50 + EMA |")  # the paper's order
    assert (tmp_path / "results" / "table.md").read_text().startswith(
        "| Name | Recipe | Resolution |")


def test_curves_and_deltas_png(runs, tmp_path):
    root, _ = runs
    paper_run(root, "none", 1, 77.0)  # a second baseline seed: the EMA row gets an interval to draw
    assert table.main(["--checkpoint-dir", str(root), "--out", str(tmp_path / "results")]) == 0
    for name in ("curves.png", "deltas.png"):
        png = tmp_path / "results" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.size[0] > 400 and image.size[1] > 150


def test_table_without_matplotlib(runs, tmp_path, capsys, monkeypatch):
    # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    captured = markdown(runs[0], tmp_path, capsys)
    assert "| ResNet50 + EMA |" in captured.out
    assert ("deltas.png skipped: matplotlib is not installed (pip install matplotlib)"
            in captured.err)
    assert not (tmp_path / "results" / "deltas.png").exists()


def test_table_without_checkpoints(tmp_path, capsys):
    assert table.main(["--checkpoint-dir", str(tmp_path / "none")]) == 2
    assert "no folder" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--delta", "-1"], ["--delta", "abc"], ["--delta", "nan"],
                                   ["--seeds", "3"]])
def test_bad_flags_give_one_message_and_exit_2(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as stop:
        table.main(["--checkpoint-dir", str(tmp_path), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(
        [line for line in err.splitlines() if "error:" in line]) == 1


def test_unwritable_out_is_one_message(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert table.main(["--checkpoint-dir", str(runs[0]), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: cannot write to {tmp_path / 'file'}")


# ---------------------------------------------------------------- Student's t and Welch's interval

def t_density_integral(q, df, steps=4000):
    """P(0 < T < q) by Simpson's rule on the density: an independent check of the quantile."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda t: scale * (1 + t * t / df) ** (-(df + 1) / 2)
    h = q / steps
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return h / 3 * (density(0) + inner + density(q))


def test_t_quantile_against_printed_tables_and_the_density():
    for df, expected in T975.items():
        assert table.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    for df in (1.3, 3.7, 7.25):  # Welch's degrees of freedom are rarely whole
        assert t_density_integral(table.t_quantile(0.975, df), df) == pytest.approx(0.475, abs=1e-9)
    assert table.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal's


def rows_by_name(root):
    return {(row.name, row.recipe_cell): row for row in table.group(run_records.read_runs(root))}


def test_welch_interval_equals_the_hand_computation(tmp_path):
    # 2 EMA seeds with variance 4/3 against 3 baseline seeds with variance 1: va/na = 2 vb/nb, so
    # Welch-Satterthwaite gives exactly 2 degrees of freedom (Student's pooled test would use 3).
    root = tmp_path / "checkpoint"
    d = math.sqrt(2 / 3)
    ema_finals, ema_bests = [80 - d, 80 + d], [81 - d, 81 + d]
    base_finals, base_bests = [77.0, 78.0, 79.0], [78.0, 79.0, 80.0]
    for seed, (final, best) in enumerate(zip(ema_finals, ema_bests)):
        paper_run(root, "ema", seed, final, best)
    for seed, (final, best) in enumerate(zip(base_finals, base_bests)):
        paper_run(root, "none", seed, final, best)
    rows = rows_by_name(root)
    ema, baseline = rows["ResNet50 + EMA", "paper"], rows["ResNet50", "paper"]
    for which, a, b in (("final", ema_finals, base_finals), ("best", ema_bests, base_bests)):
        va, vb = statistics.variance(a) / 2, statistics.variance(b) / 3
        df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
        assert df == pytest.approx(2, abs=1e-9)
        mean, half = statistics.fmean(a) - statistics.fmean(b), T975[2] * math.sqrt(va + vb)
        result = table.compare(ema, baseline, which, "baseline")
        assert result.mean == pytest.approx(mean, abs=1e-9)
        assert result.low == pytest.approx(mean - half, abs=1e-6)
        assert result.high == pytest.approx(mean + half, abs=1e-6)
        assert not result.excludes_zero


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("margin, excludes", [(1e-3, True), (-1e-3, False)])
def test_star_on_both_sides_of_the_boundary(tmp_path, capsys, sign, margin, excludes):
    # Two seeds on each side, each pair 70 -/+ 1 apart from its mean: Welch gives 2 degrees of
    # freedom and a standard error of sqrt(2), so the interval's half-width is t(0.975, 2) sqrt(2).
    # A difference just above it excludes zero, just below it does not.
    root = tmp_path / "checkpoint"
    shift = sign * (T975[2] * math.sqrt(2) + margin)
    for seed, offset in enumerate((-1.0, 1.0)):
        paper_run(root, "none", seed, 70 + offset)
        paper_run(root, "ema", seed, 70 + shift + offset)
    rows = rows_by_name(root)
    result = table.compare(rows["ResNet50 + EMA", "paper"], rows["ResNet50", "paper"], "final",
                           "baseline")
    assert result.excludes_zero == excludes
    assert min(abs(result.low), abs(result.high)) < 2e-3  # right at the boundary
    out = markdown(root, tmp_path, capsys).out
    final_cell = cells(out, "ResNet50 + EMA", after=table.DIFF_NOTE)[3]
    assert final_cell.startswith(f"{shift:+.2f} [") and final_cell.endswith(" *") == excludes


def test_fewer_than_two_seeds_prints_no_interval(tmp_path, capsys):
    root = tmp_path / "checkpoint"
    paper_run(root, "ema", 0, 80.0)
    for seed in range(3):
        paper_run(root, "none", seed, 77.0 + seed)
        paper_run(root, "ca", seed, 79.0 + seed)
    paper_run(root, "ca", 0, 78.0, net="resnet101")
    paper_run(root, "ca", 1, 79.0, net="resnet101")
    paper_run(root, "none", 0, 77.0, net="resnet101")
    out = markdown(root, tmp_path, capsys).out
    ema = cells(out, "ResNet50 + EMA", after=table.DIFF_NOTE)
    assert ema[3:] == ["needs >= 2 seeds (has 1)", "needs >= 2 seeds (has 1)", "-", "-"]
    ca = cells(out, "ResNet50 + CA", after=table.DIFF_NOTE)
    assert ca[3].startswith("+2.00 [") and ca[5] == "needs >= 2 EMA seeds (has 1)"
    ca101 = cells(out, "ResNet101 + CA", after=table.DIFF_NOTE)
    assert ca101[3:] == ["needs >= 2 baseline seeds (has 1)"] * 2 + ["no EMA run"] * 2
    assert cells(out, "ResNet50", after=table.DIFF_NOTE)[3] == "-"


def test_seeds_needed_line(tmp_path, capsys):
    root = tmp_path / "checkpoint"
    for seed, final in enumerate((80.0 - 0.22, 80.0, 80.0 + 0.22)):  # sample std 0.22
        paper_run(root, "ema", seed, final)
    paper_run(root, "none", 0, 77.0)  # one seed: no spread to pool
    s = 0.22
    # n = 6 is the first n with t(0.975, 2n-2) s sqrt(2/n) <= 0.3; for delta 0.5 it is n = 3.
    assert T975[10] * s * math.sqrt(2 / 6) <= 0.3 < T975[8] * s * math.sqrt(2 / 5)
    assert T975[4] * s * math.sqrt(2 / 3) <= 0.5 < T975[2] * s * math.sqrt(2 / 2)
    out = markdown(root, tmp_path, capsys).out
    assert (
        "Seeds per row to tell a 0.3-point difference at 95% (two-sided, two-sample): 6, the "
        "smallest n with t(0.975, 2n-2) x s x sqrt(2/n) <= 0.3, s = 0.22: the pooled sample std of "
        "final top-1 over the 1 row(s)"
        in out)
    assert "0.5-point difference at 95% (two-sided, two-sample): 3," in markdown(
        root, tmp_path, capsys,
        "--delta", "0.5").out


def test_seeds_needed_unknown_without_two_seeds(tmp_path, capsys):
    root = tmp_path / "checkpoint"
    paper_run(root, "ema", 0, 80.0)
    assert "unknown until a row of the table has >= 2 finished seeds" in markdown(
        root, tmp_path, capsys).out


# ---------------------------------------------------------------- run identity

def test_trials_of_different_identity_are_never_mixed(tmp_path, capsys):
    root = tmp_path / "checkpoint"
    paper_run(root, "ema", 0, 80.0)
    paper_run(root, "ema", 1, 81.0)
    # Two unrelated quick trials, both seed 0: they were once averaged into the paper row as 2
    # seeds.
    fake_run(root, "resnet50", "ema", 0, [2.0], planned=1, run="trial-a", subset=32)
    fake_run(root, "resnet50", "ema", 0, [1.0], planned=1, run="trial-b", subset=32, lr=0.001)
    out = markdown(root, tmp_path, capsys).out
    paper = cells(out, "ResNet50 + EMA")
    assert paper[1] == "paper" and paper[4] == "2" and paper[5] == "80.50 ± 0.71"
    other = out[out.index("Other configurations"):]
    assert cells(other, "ResNet50 + EMA")[1:6] == ["paper; epochs=1, subset=32", "32x32", "23.90M",
                                                   "1", "2.00"]
    lr_trial = next(line for line in other.splitlines() if "lr=0.001" in line)
    assert lr_trial.startswith(
        "| ResNet50 + EMA | paper; lr=0.001, epochs=1, subset=32 | 32x32 | 23.90M | 1 | 1.00 |")
    # paper: table + differences; each trial: both too
    assert out.count("| ResNet50 + EMA |") == 2 + 2 * 2


def test_same_seed_twice_counts_once_the_newest(tmp_path, capsys):
    root = tmp_path / "checkpoint"
    older = paper_run(root, "ema", 0, 79.0, run="first-try")
    newer = paper_run(root, "ema", 0, 80.0, run="second-try")
    paper_run(root, "ema", 1, 81.0)
    # older by metrics.csv's mtime, whatever the names say
    os.utime(older / "metrics.csv", (1e9, 1e9))
    out = markdown(root, tmp_path, capsys).out
    assert cells(out, "ResNet50 + EMA")[4:6] == ["2", "80.50 ± 0.71"]
    assert ("Duplicates (the same configuration and seed as a newer run, which counts instead):"
            in out)
    assert f"- {older}: seed 0, as {newer}" in out


# The rest of the args.json that `python train_cifar100.py --subset 5000 --epochs 5` writes on a
# GPU.
QUICK_TRIAL = {"b": 128, "lr": 0.1, "warm": 0, "data": "./data", "amp": "bf16", "subset": 5000,
               "nam_l1": 0.0,
               "sync_bn": False, "world": 1, "dataset": "cifar-100"}


def test_quick_trial_stays_out_of_the_paper_rows(tmp_path, capsys):
    root = tmp_path / "checkpoint"
    for seed in (0, 1):
        fake_run(root, "resnet50", "ema", seed, [5.0 + seed] * 5, planned=5, **QUICK_TRIAL)
    out = markdown(root, tmp_path, capsys).out
    assert out.startswith("No finished runs with the paper's configuration yet.")
    assert "Paper Top-1" not in out[out.index("Other configurations"):]
    assert cells(out, "ResNet50 + EMA")[1] == "paper; epochs=5, subset=5000, amp=bf16"


@pytest.mark.parametrize("args, in_paper, label", [
    ({}, True, ""),
    ({"amp": "bf16", "sync_bn": True}, True, "amp=bf16, sync_bn=True"),
    ({"b": 32, "world": 4}, True, "b=32, world=4"),  # the global batch is still 128
    ({"data": "/mnt/cifar"}, True, "data=/mnt/cifar"),  # dataset not recorded: taken for CIFAR-100
    ({"data": "/mnt/cifar", "dataset": "cifar-100"}, True, ""),
    ({"b": 64}, False, "b=64"),
    ({"world": 2}, False, "world=2"),
    ({"lr": 0.05}, False, "lr=0.05"),
    ({"epochs": 100}, False, "epochs=100"),
    ({"warm": 1}, False, "warm=1"),
    ({"recipe": "classic", "warm": 1}, True, ""),  # the classic recipe's own warm-up
    ({"recipe": "classic"}, True, ""),  # an args.json without warm: the recipe's
    ({"dataset": "custom-0123abcd"}, False, "dataset=custom-0123abcd"),
    ({"nam_l1": 1e-4}, False, "nam_l1=0.0001"),
    ({"init_from": "upstream.pth"}, False, "init_from=upstream.pth"),
    ({"changed_on_resume": "amp off -> bf16 at epoch 3 step 0"}, False,
     "changed_on_resume=amp off -> bf16 at epoch 3 step 0"),  # a mixed run
])
def test_paper_rows_admit_only_the_papers_configuration(args, in_paper, label):
    identity = run_records.run_identity({"net": "resnet50", "att": "ema", "recipe": "paper",
                                         "seed": 0, "epochs": settings.EPOCHS, **args})
    assert run_records.in_paper_rows(identity) == in_paper and run_records.label(identity) == label


# ---------------------------------------------------------------- unreadable folders

def break_folder(folder, how):
    metrics = folder / "metrics.csv"
    if how == "corrupt args.json":
        (folder / "args.json").write_text('{"net": "resnet50", "att"')
    elif how == "args.json a list":
        (folder / "args.json").write_text("[1, 2]")
    elif how == "half-written metrics.csv":
        metrics.write_text(metrics.read_text()[:-20])
    elif how == "non-numeric value":
        metrics.write_text(metrics.read_text().replace(",79.0,", ",n/a,", 1))
    elif how == "missing column":
        metrics.write_text(metrics.read_text().replace("test_top5", "top5"))
    elif how == "no epoch column":
        metrics.write_text(metrics.read_text().replace("epoch,", "step,", 1))
    elif how == "empty metrics.csv":
        metrics.write_text("")
    elif how == "a list as a value":
        (folder / "args.json").write_text(
            json.dumps({**json.loads((folder / "args.json").read_text()), "subset": [1, 2]}))
    elif how == "missing seed":
        (folder / "args.json").write_text(json.dumps({"net": "resnet50", "att": "none",
                                                      "recipe": "paper",
                                                      "epochs": 200}))


WHY = {"corrupt args.json": "args.json is not valid JSON",
       "args.json a list": "are a list, not a JSON object",
       "half-written metrics.csv": "does not have 8 values (half-written?)",
       "non-numeric value": "test_top1 is 'n/a', not a number",
       "missing column": "has no test_top5 column",
       "empty metrics.csv": "metrics.csv is empty", "no epoch column": "has no epoch column",
       "missing seed": "lack 'seed'",
       "a list as a value": "'subset' is [1, 2], not a single value"}


def test_unreadable_folders_are_skipped_with_one_line_each(runs, tmp_path, capsys):
    root, _ = runs
    broken = {}
    for seed, how in enumerate(WHY, 10):
        folder = paper_run(root, "none", seed, 79.0)
        break_folder(folder, how)
        broken[folder] = WHY[how]
    captured = markdown(root, tmp_path, capsys)
    assert cells(captured.out,
                 "ResNet50 + EMA")[4] == "3" and cells(captured.out, "ResNet50")[4] == "1"
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(broken)
    for folder, why in broken.items():
        assert any(line.startswith(f"skipped {folder}: ") and why in line for line in skipped)
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("args, why", [
    ({"att": "bam"}, "this checkout has no attention module 'bam' (models/)"),
    ({"net": "vgg16"}, "this checkout has no network 'vgg16'"),
    ({"att_stages": "5"}, "'att_stages' is '5' (argument --att-stages: expected distinct"),
    ({"classes": 10 ** 9}, "'classes' is 1000000000, not a number of classes"),
    ({"epochs": -5}, "'epochs' is -5 (argument --epochs: must be positive"),
    ({"b": 0}, "'b' is 0 (argument -b/--b/--batch-size: must be positive"),
    ({"lr": math.inf}, "'lr' is inf (argument -lr: must be positive"),
    ({"seed": math.nan}, "'seed' is nan (argument --seed: expected a whole number"),
    ({"amp": "fp8"}, "'amp' is 'fp8' (argument --amp: invalid choice"),
    ({"recipe": ["paper"]}, "unknown recipe ['paper']"),
    ({"world": 0}, "'world' is 0, not a number of processes"),
    ({"classes": 0}, "'classes' is 0, not a number of classes"),
    ({"net": "mobilenetv2", "att_stages": "3,4"}, "--att-stages places the attention module in"),
    ({"att": "none", "att_stages": "3,4"}, "--att-stages places the attention module in"),
])
def test_one_run_the_table_cannot_interpret_is_skipped_and_the_rest_prints(
        tmp_path, capsys, args, why):
    """A branch's new module sharing checkpoint/, or values no run could have had: skipped with
    one line naming the folder and why; the other runs still make the table."""
    root = tmp_path / "checkpoint"
    paper_run(root, "ema", 0, 80.0)
    extra = {key: value for key, value in args.items() if key not in ("net", "att", "seed")}
    odd = fake_run(root, args.get("net", "resnet50"), args.get("att", "ema"), args.get("seed", 1),
                   [70.0], planned=1, run="odd", **extra)
    captured = markdown(root, tmp_path, capsys)
    assert cells(captured.out, "ResNet50 + EMA")[4:6] == ["1", "80.00"]
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert skipped == [f"skipped {odd}: " + skipped[0].split(": ", 1)[1]] and why in skipped[0]


@pytest.mark.parametrize("column, value", [("test_top1", -3.0), ("test_top5", 140.0),
                                           ("train_loss", -1.0), ("lr", -0.1)])
def test_metrics_no_run_writes_are_skipped(tmp_path, capsys, column, value):
    root = tmp_path / "checkpoint"
    paper_run(root, "ema", 0, 80.0)
    odd = paper_run(root, "ema", 1, 81.0, run="odd")
    with open(odd / "metrics.csv") as f:
        lines = f.read().splitlines()
    header = lines[0].split(",")
    row = lines[5].split(",")
    row[header.index(column)] = str(value)
    (odd / "metrics.csv").write_text("\n".join(lines[:5] + [",".join(row)] + lines[6:]) + "\n")
    captured = markdown(root, tmp_path, capsys)
    assert cells(captured.out, "ResNet50 + EMA")[4:6] == ["1", "80.00"]
    assert (f"skipped {odd}: metrics.csv row 5: {column} is {value:g}, which no run writes"
            in captured.err)


def test_ctrl_c_during_the_table_is_one_line(tmp_path, monkeypatch, capsys):
    paper_run(tmp_path, "ema", 0, 80.0)

    def interrupted(checkpoint_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(table, "read_runs", interrupted)
    assert table.main(["--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == "SIGINT: stopped"


def test_a_run_stopped_inside_its_first_epoch_is_listed_unfinished(tmp_path, capsys):
    root = tmp_path / "checkpoint"
    paper_run(root, "ema", 0, 80.0)
    started = fake_run(root, "resnet50", "ema", 1, [], planned=200)
    (started / "metrics.csv").unlink()  # no epoch finished yet: args.json (and last.pth) only
    out = markdown(root, tmp_path, capsys).out
    assert cells(out, "ResNet50 + EMA")[4:6] == ["1", "80.00"]
    assert f"- {started}: 0/200 epochs" in out



@pytest.mark.parametrize("how", ["metrics.csv a FIFO", "args.json a folder", "args.json nested",
                                 "more epochs than planned", "metrics.csv with a BOM"])
def test_odd_run_files_are_one_line_each_and_never_hang(tmp_path, capsys, how):
    root = tmp_path / "checkpoint"
    paper_run(root, "ema", 0, 80.0)
    odd = fake_run(root, "resnet50", "ema", 1, [70.0, 71.0], planned=2, run="odd")
    if how == "metrics.csv a FIFO":
        (odd / "metrics.csv").unlink()
        os.mkfifo(odd / "metrics.csv")
    elif how == "args.json a folder":
        (odd / "args.json").unlink()
        (odd / "args.json").mkdir()
    elif how == "args.json nested":
        (odd / "args.json").write_text("[" * 100000 + "]" * 100000)
    elif how == "more epochs than planned":
        args = json.loads((odd / "args.json").read_text())
        (odd / "args.json").write_text(json.dumps({**args, "epochs": 1}))
    else:
        (odd / "metrics.csv").write_bytes(b"\xef\xbb\xbf" + (odd / "metrics.csv").read_bytes())
    captured = markdown(root, tmp_path, capsys)
    if how == "metrics.csv with a BOM":  # as Excel saves it: read
        assert "skipped" not in captured.err and cells(captured.out, "ResNet50 + EMA")[4] == "1"
        return
    assert cells(captured.out, "ResNet50 + EMA")[4:6] == ["1", "80.00"]
    assert [line for line in captured.err.splitlines() if line.startswith(f"skipped {odd}: ")]
