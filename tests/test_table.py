"""table.py on fake run folders, and reproduce.py's commands."""
import csv
import json
import statistics

import pytest
from PIL import Image

import reproduce
import table
from conf import settings

FIELDS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "seconds"]


def fake_run(root, net, att, seed, top1s, planned, recipe="paper"):
    folder = root / f"{net}_{att}" / f"{recipe}-seed{seed}"
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"net": net, "att": att, "recipe": recipe, "seed": seed,
                                                  "epochs": planned}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for epoch, top1 in enumerate(top1s, 1):
            writer.writerow({"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_top1": 50, "test_loss": 1.5,
                             "test_top1": top1, "test_top5": top1 + 15, "seconds": 3})
    (folder / "last.pth").write_bytes(b"placeholder")
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "checkpoint"
    ema = {0: [40.0, 79.0, 78.5], 1: [42.0, 80.5, 80.25], 2: [41.0, 77.0, 81.0]}  # seed: test top-1 per epoch
    for seed, top1s in ema.items():
        fake_run(root, "resnet50", "ema", seed, top1s, planned=3)
    fake_run(root, "resnet50", "ema", 3, [45.0], planned=3)  # unfinished: must not count
    fake_run(root, "resnet50", "none", 0, [30.0, 70.0, 77.5], planned=3)
    return root, ema


def cells(out: str, name: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_means_stds_counts_and_paper(runs, tmp_path, capsys):
    root, ema = runs
    assert table.main(["--checkpoint-dir", str(root), "--out", str(tmp_path / "results"), "--markdown"]) == 0
    out = capsys.readouterr().out
    row = dict(zip(table.HEADER[:9], cells(out, "ResNet50 + EMA")))
    finals = [v[-1] for v in ema.values()]
    bests = [max(v) for v in ema.values()]
    assert row["Seeds"] == "3" and row["Recipe"] == "paper" and row["Resolution"] == "32x32"
    assert row["#Params"] == "23.90M"
    assert row["Top-1 final"] == f"{statistics.fmean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert row["Top-1 best"] == f"{statistics.fmean(bests):.2f} ± {statistics.stdev(bests):.2f}"
    assert row["Top-5 best"] == f"{statistics.fmean(bests) + 15:.2f} ± {statistics.stdev(bests):.2f}"
    paper_top1 = 80.69
    ema_cells = cells(out, "ResNet50 + EMA")
    assert ema_cells[9] == f"{paper_top1:.2f}" and ema_cells[10] == f"{statistics.fmean(bests) - paper_top1:+.2f}"
    baseline = cells(out, "ResNet50")
    assert baseline[4] == "1" and baseline[5] == "77.50" and baseline[9] == "77.26"  # one seed: no ± part
    # The unfinished run is listed apart with its progress, never averaged in.
    assert "Unfinished (not in the table):" in out and "paper-seed3: 1/3 epochs" in out
    assert out.index("| ResNet50 |") < out.index("| ResNet50 + EMA |")  # the paper's order
    assert (tmp_path / "results" / "table.md").read_text().startswith("| Name | Recipe | Resolution |")


def test_curves_png(runs, tmp_path):
    root, _ = runs
    assert table.main(["--checkpoint-dir", str(root), "--out", str(tmp_path / "results")]) == 0
    png = tmp_path / "results" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] > 400 and image.size[1] > 300


def test_table_without_checkpoints(tmp_path, capsys):
    assert table.main(["--checkpoint-dir", str(tmp_path / "none")]) == 2
    assert "no folder" in capsys.readouterr().err


def test_reproduce_prints_every_row(tmp_path, capsys):
    assert reproduce.main(["--seeds", "2", "--recipe", "paper", "classic",
                           "--checkpoint-dir", str(tmp_path), "--gpus", "0,1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = {(net, att) for net, att, *_ in settings.PAPER_TABLE if att != "ssa"}
    assert len(expected) == 10
    seen = set()
    for line in lines:
        words = line.split()
        assert words[0] in ("CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1")
        value = lambda flag: words[words.index(flag) + 1]
        seen.add((value("-net"), value("-att"), value("--recipe"), value("--seed")))
        assert value("--run-name") == f"{value('--recipe')}-seed{value('--seed')}"
    assert seen == {(net, att, recipe, seed) for net, att in expected for recipe in ("paper", "classic")
                    for seed in ("0", "1")}


def test_reproduce_skips_finished_and_resumes_interrupted(tmp_path, capsys):
    fake_run(tmp_path, "resnet50", "ema", 0, [10.0, 20.0], planned=2)  # finished
    interrupted = fake_run(tmp_path, "resnet101", "ca", 0, [10.0], planned=2)
    assert reproduce.main(["--seeds", "1", "--checkpoint-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "# resnet50 + ema, paper, seed 0: done" in captured.out
    assert f"python train_cifar100.py --resume {interrupted}   # resumes" in captured.out
    assert "1 done, 1 to resume, 8 to start" in captured.err
