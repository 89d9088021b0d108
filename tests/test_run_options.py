"""training/options.py: every option of the training parser is classified, the lists derived from
the table are the ones the trainer, the resume and table.py used to write out by hand, an option the
table does not know counts as part of a run's identity, and docs/training.md's options table is the
table's."""
import argparse
import json
from pathlib import Path

import pytest

from training import arguments, cli, run_records
from training import options as run_options
from training.options import OPTIONS, REQUIRED, ROW

from test_runs import copy_run, resume
from test_table import cells, fake_run, markdown, paper_run


def parser_options(parser: argparse.ArgumentParser) -> list[str]:
    return list(vars(parser.parse_args([])))


def test_every_option_of_the_training_parser_is_classified():
    missing = run_options.unclassified(parser_options(cli.train_parser()))
    assert missing == [], f"classify {missing} in training/options.py OPTIONS"


def test_the_check_fails_for_an_option_the_table_does_not_know(monkeypatch):
    def with_a_new_option():
        p = real()
        p.add_argument("--never-classified", type=float, default=0.0)  # a name no option will take
        return p

    real = cli.train_parser
    monkeypatch.setattr(cli, "train_parser", with_a_new_option)
    assert run_options.unclassified(parser_options(cli.train_parser())) == ["never_classified"]


def test_the_table_holds_only_the_parsers_options_and_what_the_trainer_records():
    parsed = set(parser_options(cli.train_parser()))
    assert {name for name, o in OPTIONS.items() if o.option} == parsed
    assert {name for name, o in OPTIONS.items() if not o.option} == {
        "world", "dataset", "changed_on_resume", "run_id", "classes", "class_names", "mean", "std",
        "subset_draw"}


def test_identity_options_say_what_the_paper_and_older_runs_used():
    for name in run_options.IDENTITY:
        option = OPTIONS[name]
        assert option.paper != run_options.ANY, name
        # an older run without it cannot be read: only what every run recorded
        if option.older == REQUIRED:
            assert name in {"net", "att", "recipe", "epochs"}, name
    assert [name for name in run_options.IDENTITY if OPTIONS[name].paper == ROW] == [
        "net", "att", "recipe"]


def test_the_derived_lists():
    """The lists as train_cifar100.py and table.py wrote them out before the table existed (a new
    option may add to them: these are what they must still hold)."""
    assert {"epochs", "data", "workers", "loader", "amp", "channels_last", "compile",
            "cuda_graphs"} <= set(run_options.RESUMABLE_OVERRIDES)
    assert {"amp", "world", "dataset"} <= set(run_options.IDENTITY_CHANGES_ON_RESUME)
    assert {"resume", "init_from", "run", "checkpoint_dir",
            "log_dir"} <= set(run_options.NOT_RESUMED)
    assert set(run_options.GIVEN_ON_RESUME) == set(run_options.RESUMABLE_OVERRIDES) | set(
        run_options.WHERE_OPTIONS)
    assert {"resume", "checkpoint_dir", "log_dir"} <= set(run_options.WHERE_OPTIONS)
    old_identity = ["net", "att", "recipe", "lr", "b", "world", "epochs", "warm", "subset",
                    "dataset", "amp",
                    "nam_l1", "sync_bn", "init_from", "changed_on_resume"]
    # labels keep this order
    assert [name for name in run_options.IDENTITY if name in old_identity] == old_identity
    assert {"lr", "b", "world", "epochs", "warm", "nam_l1"} <= set(run_options.NUMBERS)
    assert {"amp", "sync_bn", "b", "world"} <= set(run_options.ARITHMETIC_IDENTITY)
    assert {"loader", "amp", "channels_last",
            "compile"} <= set(run_options.arithmetic_on_resume({"loader": "device"}))
    assert "workers" not in run_options.arithmetic_on_resume({"loader": "device"})
    assert "workers" in run_options.arithmetic_on_resume({"loader": "workers"})
    assert run_records.paper_configuration("classic")["warm"] == 1
    assert run_records.paper_configuration("paper")["warm"] == 0


def test_an_unclassified_key_keeps_two_runs_apart_and_out_of_the_paper_rows(tmp_path, capsys):
    """A key added to args.json but not to the table: the runs with and without it are not one
    seed."""
    root = tmp_path / "checkpoint"
    paper_run(root, "ema", 0, 80.0)
    paper_run(root, "ema", 1, 81.0)
    paper_run(root, "ema", 0, 70.0, run="flagged", new_flag=0.1)
    out = markdown(root, tmp_path, capsys).out
    assert "Duplicates" not in out
    assert cells(out, "ResNet50 + EMA")[4:6] == ["2", "80.50 ± 0.71"]
    other = out[out.index("Other configurations"):]
    assert cells(other, "ResNet50 + EMA")[1] == "paper; new_flag=0.1"


@pytest.mark.parametrize("value", [0.1, [1, 2], {"a": 1}, None])
def test_an_unclassified_key_is_part_of_the_identity(value):
    args = {"net": "resnet50", "att": "ema", "recipe": "paper", "seed": 0, "epochs": 200}
    plain, flagged = run_records.run_identity(args), run_records.run_identity(
        {**args, "new_flag": value})
    assert plain != flagged and hash(flagged) is not None
    assert not run_records.in_paper_rows(flagged)
    shown = value if not isinstance(value, (list, dict)) else json.dumps(value)
    assert run_records.label(flagged) == f"new_flag={shown}"


def test_an_unfinished_run_with_an_unclassified_key_stays_unfinished(tmp_path, capsys):
    root = tmp_path / "checkpoint"
    fake_run(root, "resnet50", "ema", 0, [1.0], planned=2, new_flag=True)
    out = markdown(root, tmp_path, capsys).out
    assert "1/2 epochs" in out


def test_docs_training_md_shows_the_option_table():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    table = run_options.markdown_table()
    assert table in docs, f"paste this table into docs/training.md's Options section:\n{table}"


def test_the_parser_gives_only_what_was_typed():
    """Nothing is filled in by the parser: a resume can tell what was given from what was not."""
    assert set(vars(cli.train_parser().parse_args([])).values()) == {None}
    given = vars(cli.train_parser().parse_args(["-b", "128", "--no-compile", "--sync-bn"]))
    assert {name: value for name, value in given.items() if value is not None} == {
        "b": 128, "compile": False, "sync_bn": True}


@pytest.mark.parametrize("name", run_options.FLAGS)
def test_each_default_passes_its_own_check(name):
    """What a new run records is what a resume accepts back."""
    default = OPTIONS[name].default
    if default is not None:
        assert run_options.checked(name, default) == default


@pytest.mark.parametrize("name, value, message", [
    ("b", 0, "argument -b/--b/--batch-size: must be positive, got 0"),
    ("seed", 2 ** 70, "argument --seed: must be between 0 and 2**63 - 1"),
    ("amp", "fp8", "argument --amp: invalid choice: 'fp8' (choose from 'off', 'bf16', 'fp16')"),
    ("compile", "yes", "compile is 'yes', not true or false"),
    ("att_stages", "5", "expected distinct ResNet stages from 1 to 4"),
    ("net", "vgg16", "argument -net: invalid choice: 'vgg16'"),
])
def test_a_recorded_value_is_checked_by_its_options_own_type(name, value, message):
    with pytest.raises(run_options.BadValue, match=message.replace("*", r"\*").replace("(", r"\(")
                       .replace(")", r"\)")):
        run_options.checked(name, value)


def test_a_recorded_run_whose_options_conflict_is_refused(tmp_path):
    """A record the command line would have refused (--gate-images with -att ca, here) is refused
    on resume with the same reason, as when the record went through the parser."""
    recorded = {"net": "resnet18", "att": "ca", "gate_images": 2, "resume": "somewhere"}
    with pytest.raises(arguments.UserError, match="cannot be resumed .--gate-images draws EMA's"):
        arguments.checked_recorded(recorded, tmp_path / "last.pth")
    assert arguments.checked_recorded({**recorded, "gate_images": 0}, tmp_path)["att"] == "ca"


def test_a_resume_notes_only_what_it_ignores(finished_small_run, tmp_path, capsys):
    """The options a resume keeps are named when given with another value than the run's own,
    not when given as the run recorded them (reproduce.py passes its options to every resume)."""
    run = copy_run(finished_small_run, tmp_path, "noted")
    assert resume(tmp_path, run, "--epochs", "2", "-b", "16", "-lr", "0.5") == 0
    assert "ignored: -lr\n" in capsys.readouterr().err
    assert resume(tmp_path, run, "--epochs", "2", "-b", "16") == 0
    assert "ignored" not in capsys.readouterr().err


def test_the_tables_stages_are_the_models():
    import models
    assert run_options.RESNET_STAGES == models.ALL_STAGES
    assert run_options.att_stages("4, 3") == "3,4" and run_options.att_stages("1,2,3,4") is None
