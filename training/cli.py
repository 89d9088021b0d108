"""The command lines: train_cifar100.py's parser, built from the option table (training/options.py),
and the flags the other scripts share with it (-net, -att, -weights, --amp, --data mean the same in
train_cifar100.py, test.py, gradcam.py, export.py and benchmark.py). Bad values end in argparse's
one-line message and exit code 2.

The training parser gives only what was typed: an option not given is None, and
training/arguments.py's settle() fills it (a new run's default, or the resumed run's own value).
"""
import argparse
import sys
from typing import Optional

from conf import settings
from training.options import OPTIONAL_PATH, OPTIONS, SWITCH, TOGGLE, number, seed, shown_default

__all__ = ["seed"]  # the other scripts' seeds take the same values

CHECKPOINTS_DEFAULT = "the checkpoint's"


def positive(kind):
    """A parser of positive, finite `kind` (int or float) text, for the other scripts' options."""
    return number(kind, positive=True)


def answer_help(make_parser) -> None:
    """Print a script's help and exit, when asked for it, before the script imports the rest."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        make_parser().print_help()
        sys.exit(0)


def add_option(p, name: str, default=None, help: str = None) -> None:
    """Option `name` of the table, as its row defines it; `default` is what the parser fills in."""
    o = OPTIONS[name]
    kwargs = {"dest": name, "default": default, "help": help or help_text(o)}
    if o.form == SWITCH:
        kwargs["action"] = "store_true"
    elif o.form == TOGGLE:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs.update(type=o.type, choices=o.allowed(), metavar=o.metavar)
        if o.form == OPTIONAL_PATH:
            kwargs.update(nargs="?", const="newest")
    p.add_argument(*o.flags, **kwargs)


def help_text(o) -> str:
    shown = shown_default(o)
    return f"{o.help} (default: {shown})" if shown else o.help


def train_parser(prog: str = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                description="Train a CIFAR ResNet with an attention module on "
                                            "CIFAR-100.")
    for name, option in OPTIONS.items():
        if option.flags:
            add_option(p, name)
    return p


def parse_train_args(argv=None) -> argparse.Namespace:
    """What was given on the command line (None where nothing was), with the checks that concern
    two options at once."""
    p = train_parser()
    args = p.parse_args(argv)
    problem = conflict(vars(args))
    if problem:
        p.error(problem)
    return args


def conflict(args: dict) -> Optional[str]:
    """What is wrong with these options together (a command line's, or a resumed run's record),
    or None."""
    att, resumed = args.get("att"), args.get("resume")
    if args.get("gate_images") and att not in (None, "ema") and not resumed:
        return f"--gate-images draws EMA's gates, and -att {att} has none"
    not_a_resnet = att == "none" or args.get("net") == "mobilenetv2"
    if args.get("att_stages") and not resumed and not_a_resnet:
        return (f"--att-stages places the attention module in a ResNet's stages: not with "
                f"{'-att none' if att == 'none' else '-net mobilenetv2'}")
    if args.get("init_from") and resumed:
        return "--init-from starts a new run; --resume continues one: give one of them"
    return None


# ---------------------------------------------------------------- the other scripts' flags

def add_model(p, net=None, att=None) -> None:
    """-net and -att; without defaults they default to what the checkpoint records."""
    add_option(p, "net", net, f"network (default: {net or CHECKPOINTS_DEFAULT})")
    add_option(p, "att", att, f"{OPTIONS['att'].help} (default: {att or CHECKPOINTS_DEFAULT})")


def add_weights(p) -> None:
    p.add_argument("-weights", "--weights", required=True,
                   help="a checkpoint: this repo's (a file, or a run folder for its last.pth), or "
                        "one written by the NAM authors' or the classic CIFAR-100 script "
                        "(docs/data.md: Checkpoints from other repos)")


def add_amp(p) -> None:
    add_option(p, "amp")


def add_data(p, default=settings.DATA_DIR, whose: str = "") -> None:
    shown = f"{whose}, else {settings.DATA_DIR}" if whose else default or settings.DATA_DIR
    add_option(p, "data", default, f"{OPTIONS['data'].help} (default {shown})")
