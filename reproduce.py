"""The commands that reproduce every row of the paper's CIFAR-100 table, N seeds each.

    python reproduce.py --seeds 3                        # print them (nothing runs)
    python reproduce.py --seeds 3 --run                  # run them one after another
    python reproduce.py --seeds 3 --gpus 0,1,2,3 --run   # one run per GPU at a time
    python reproduce.py --seeds 1 -net resnet101 --run --epochs 1 --subset 256   # tried small
    python reproduce.py --seeds 3 --slurm --time 4:00:00 --submit   # a job array on a cluster

Options reproduce.py does not know are passed on to every job (checked by the training parser
first); -net and -att pick rows of the table. A SIGTERM or SIGHUP to reproduce.py is passed on to
the running jobs, which save and stop, and nothing more starts.

Rerunning it is safe: finished runs are skipped and interrupted ones resumed, because each run has
a fixed folder, checkpoint/<net>_<att>/<recipe>-seed<S>/. A folder that cannot be read, or that
holds another run (one of a campaign tried small: other epochs, subset, ...), is skipped with one
line saying why. Then `python table.py`.

With --slurm: a job-array script for the runs that still need work (one array task a run; those
queued or running already are skipped and said), written under <checkpoint-dir>/slurm/; --submit
sbatches it. On SLURM's warning before the time limit a run saves and its task requeues itself
(training/slurm.py). Without --run or --slurm, the plan shows each run's SLURM state, if queued.
"""
import argparse
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conf import settings
from training import cli, options, run_records, slurm
from training.stopping import STOP_SIGNALS, handled

ROWS = settings.TRAINED_ROWS
TRAINER = Path(__file__).resolve().parent / "train_cifar100.py"  # run from any folder
# What reproduce.py sets for each job itself: not to be passed through.
SET_PER_JOB = ("net", "att", "recipe", "seed", "run", "checkpoint_dir", "resume", "init_from")


@dataclass
class Job:
    net: str
    att: str
    recipe: str
    seed: int
    folder: Path
    state: str  # "new", "interrupted", "done" or "skipped" (unreadable)
    command: list
    # the arguments that start the run (a SLURM task takes these, or a resume if it saved)
    new_run: list = field(default_factory=list)

    def shell(self, gpu=None) -> str:
        prefix = f"CUDA_VISIBLE_DEVICES={gpu} " if gpu is not None else ""
        return prefix + shlex.join(self.command)  # paths with spaces paste as they are


def run_state(folder: Path, planned: dict) -> str:
    """"new", "interrupted", "done" or "skipped": a folder that cannot be read, or that holds a run
    other than the one planned (a campaign tried small, say), is skipped with one line, never
    resumed or counted as done."""
    checkpoint, metrics = (folder / "last.pth").is_file(), (folder / "metrics.csv").is_file()
    if not metrics and (folder / "best.pth").is_file() and not checkpoint:
        print(f"skipped {folder}: best.pth without last.pth or metrics.csv", file=sys.stderr)
        return "skipped"
    if not metrics and not checkpoint:
        return "new"  # never started
    try:
        args = run_records.run_args(folder)
        # None: stopped within its first epoch
        run = run_records.read_run(folder, args) if metrics else None
        values = {**(run.identity if run else run_records.run_identity(args))._asdict(),
                  "data_format": run_records.data_format(args)}
    except run_records.UnreadableRun as e:
        print(f"skipped {folder}: {e}", file=sys.stderr)
        return "skipped"
    values["seed"] = args.get("seed")
    if planned.get("dataset") is None or not run_records.RECORDED_DATASET.fullmatch(
            str(values["dataset"])):
        planned = {key: value for key, value in planned.items() if key != "dataset"}  # unknown
    other = [f"{key}={values[key]} (planned: {value})" for key, value in planned.items()
             if values[key] != value
             and not (key == "dataset" and run_records.same_dataset(values[key], value))]
    if other:
        print(
            f"skipped {folder}: it holds another run, {', '.join(other)}; move it away, or give "
            f"this campaign another --checkpoint-dir", file=sys.stderr)
        return "skipped"
    if run is None or not run.finished and checkpoint:
        return "interrupted"
    if run.finished:
        return "done"
    # Its results kept, its last.pth gone: nothing to resume, nothing to overwrite.
    print(
        f"skipped {folder}: unfinished ({len(run.rows)}/{run.identity.epochs} epochs) and no "
        f"last.pth to resume", file=sys.stderr)
    return "skipped"


def planned_identity(training: list[str], net: str, att: str, recipe: str) -> dict:
    """The identity values a job's command fixes (with the options passed on), and its --dataset,
    that a run folder's run must have to be this job's; the others the trainer resolves (precision,
    the files)."""
    typed = vars(cli.train_parser().parse_args(training
                                               + ["-net", net, "-att", att, "--recipe", recipe]))
    given = options.with_defaults(typed)
    fixed = {key: given[key] for key in options.IDENTITY
             if key in given and options.OPTIONS[key].resume in (options.KEPT, options.EXTENDS)}
    # which --dataset: kept on resume, as the identity
    return fixed | {"data_format": given["data_format"]}


def planned_dataset(root, kind: str):
    """What --data holds, by the trainer's own name for it ("cifar-100", "custom-<8 hex>"), where
    its CIFAR files are there; None where that cannot be told without training (not downloaded
    yet, or a folder of images, whose name comes from decoding them)."""
    from training import cifar, run_data  # torch: only to plan against runs already there
    form, root = run_data.FORMATS.get(kind), Path(root)
    if form is None or not form.complete_in(root):
        return None
    return cifar.identity_of(cifar.files_md5(root, form, "train"),
                             cifar.files_md5(root, form, "test"), form)


def trainer_command() -> list[str]:
    """How a job starts the trainer: this Python, the trainer's path (run from any folder)."""
    return [sys.executable, str(TRAINER)]


def plan(args) -> list[Job]:
    jobs, datasets = [], {}
    rows = [(net, att) for net, att in ROWS if net in (args.net or [net])
            and att in (args.att or [att])]
    for recipe in args.recipe:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for net, att in rows:
                name = f"{recipe}-seed{seed}"
                folder = Path(args.checkpoint_dir) / f"{net}_{att}" / name
                planned = planned_identity(args.training, net, att, recipe)
                where = (args.data or settings.DATA_DIR, planned["data_format"])
                if folder.exists() and where not in datasets:  # read once, where it matters
                    datasets[where] = planned_dataset(*where)
                planned |= {"seed": seed, "dataset": datasets.get(where)}
                state = run_state(folder, planned)
                command = trainer_command() if args.run else ["python", "train_cifar100.py"]
                new_run = ["-net", net, "-att", att, "--recipe", recipe, "--seed", str(seed),
                           "--run-name", name, "--checkpoint-dir", args.checkpoint_dir]
                new_run += ["--data", args.data] if args.data else []
                command += ["--resume", str(folder)] if state == "interrupted" else new_run
                jobs.append(Job(net, att, recipe, seed, folder, state, command + args.training,
                                new_run))
    return jobs


# The exit codes of a job asked to stop: 128 + the signal where it handled it, minus the signal
# where it was killed by it (a crash, e.g. SIGSEGV, is a failure like any other and the queue goes
# on).
STOP_CODES = {code for sig in STOP_SIGNALS for code in (128 + sig, -sig)}


def run_all(jobs: list[Job], gpus: list) -> tuple[int, int, int]:
    """Run the jobs, one per GPU at a time (or one at a time without --gpus), until they are done or
    one is stopped by a signal; (jobs started, jobs that failed, the stop signal passed on or 0)."""
    todo = queue.Queue()
    for job in jobs:
        todo.put(job)
    started, failed, stop, running, stopped_by = [], [], threading.Event(), set(), []

    # to reproduce.py alone (a kill, a closed session): the jobs save and stop
    def pass_on(signum, frame):
        stop.set()
        stopped_by.append(signum)
        for proc in list(running):
            proc.send_signal(signum)

    def worker(gpu):
        while not stop.is_set():
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            print(f"start: {job.shell(gpu)}", flush=True)
            started.append(job)
            proc = subprocess.Popen(job.command, env=env)
            running.add(proc)
            code = proc.wait()
            running.discard(proc)
            print(f"{'done' if code == 0 else f'exit {code}'}: {job.folder}", flush=True)
            if code:
                failed.append(job)
            if code in STOP_CODES:  # start nothing more
                stop.set()

    # nohup: ignored
    previous = {sig: signal.signal(sig, pass_on) for sig in handled(STOP_SIGNALS[1:])}
    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in (gpus or [None])]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:  # the running jobs got the Ctrl-C too: they save and stop
        stop.set()
        stopped_by.append(signal.SIGINT)
        for t in threads:
            t.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return len(started), len(failed), (stopped_by or [0])[0]


def check_training_options(p, passed: list[str]) -> None:
    """Options to pass through to every job: the training parser's, minus what each job sets itself;
    otherwise argparse's one line and exit 2."""
    given, unknown = cli.train_parser(
        prog="reproduce.py (passed on to train_cifar100.py)").parse_known_args(passed)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    own = [name for name in SET_PER_JOB if getattr(given, name) is not None]
    if own:
        p.error(
            f"reproduce.py sets {', '.join(own)} for each job itself; give -net/-att to pick rows")


def gpu_ids(text):
    """'0,1' -> ['0', '1']: distinct CUDA device numbers."""
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not all(i.isdigit() for i in ids) or len(set(map(int, ids))) != len(ids):
        raise argparse.ArgumentTypeError(f"expected distinct GPU numbers such as 0,1, got {text!r}")
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--seeds", type=cli.positive(int), default=3, help="seeds per row")
    p.add_argument("--first-seed", type=cli.seed, default=0)
    p.add_argument("--recipe", nargs="+", default=["paper"], choices=list(settings.RECIPES))
    p.add_argument("--gpus", type=gpu_ids, default=[],
                   help="comma-separated GPU ids, one run on each at a time")
    p.add_argument("--data", default=None, help="passed on to train_cifar100.py")
    p.add_argument("--checkpoint-dir", default=settings.CHECKPOINT_DIR)
    p.add_argument("--run", action="store_true", help="run the commands instead of printing them")
    p.add_argument("-net", nargs="+", choices=sorted({net for net, _ in ROWS}),
                   help="only these networks' rows")
    p.add_argument("-att", nargs="+", choices=sorted({att for _, att in ROWS}),
                   help="only these modules' rows")
    add_slurm_options(p)
    args, args.training = p.parse_known_args(argv)
    check_training_options(p, args.training)
    if args.run and args.slurm:
        p.error("--run runs the jobs here, --slurm on a cluster: give one of them")
    if args.submit and not args.slurm:
        p.error("--submit goes with --slurm")

    jobs = plan(args)
    pending = [job for job in jobs if job.state in ("new", "interrupted")]
    if args.slurm:
        return slurm_campaign(args, pending)
    if not args.run:
        queue = slurm.queued(args.checkpoint_dir)
        for job in jobs:
            gpu = None
            if args.gpus and job in pending:
                gpu = args.gpus[pending.index(job) % len(args.gpus)]
            state, task = queue.get(job.folder.resolve(), (None, None))
            where = f"   # SLURM: {state.lower()} as {task}" if state else ""
            if job.state == "done":
                print(f"# {job.net} + {job.att}, {job.recipe}, seed {job.seed}: done")
            elif job.state != "skipped":  # its warning is above
                print(job.shell(gpu) + ("   # resumes" if job.state == "interrupted" else "")
                      + where)
        count = lambda state: sum(job.state == state for job in jobs)
        skipped = f", {count('skipped')} skipped" if count("skipped") else ""
        print(
            f"# {len(jobs)} runs: {count('done')} done, {count('interrupted')} to resume, "
            f"{count('new')} to start{skipped}", file=sys.stderr)
        return 0
    started, failed, stopped_by = run_all(pending, args.gpus)
    unstarted = (f"; {len(pending) - started} not started (rerun this command to continue)"
                 if started < len(pending) else "")
    print(f"{started - failed} of {len(pending)} runs ended well{unstarted}; then: python table.py")
    return 128 + stopped_by if stopped_by else 1 if failed else 0


def add_slurm_options(p):
    group = p.add_argument_group("on a SLURM cluster (docs/reproducing.md)")
    group.add_argument("--slurm", action="store_true",
                       help="write a job-array script for the runs that need work")
    group.add_argument("--submit", action="store_true", help="and sbatch it")
    group.add_argument("--partition", default=None)
    group.add_argument("--gpus-per-task", type=options.at_least_0, default=1,
                       help="GPUs a run trains on (more than 1: torchrun); 0 on a CPU cluster")
    group.add_argument("--cpus-per-task", type=cli.positive(int), default=None)
    group.add_argument("--time", default=None, help="a task's time limit, e.g. 4:00:00")
    group.add_argument("--warning", type=cli.positive(int), default=300, metavar="SECONDS",
                       help="how long before the limit a run is told to save and stop")
    group.add_argument("--max-requeues", type=options.at_least_0, default=10,
                       help="requeues a task may make (a run that cannot finish stops there)")
    group.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                       help="more sbatch options for every task, e.g. --sbatch=--account=lab "
                            "(repeat it)")


def slurm_campaign(args, pending: list[Job]) -> int:
    """Write (and with --submit, sbatch) the job-array script for the pending runs that are neither
    queued nor running."""
    if args.submit and not slurm.available():
        print("error: --submit needs sbatch, which is not on this machine's PATH", file=sys.stderr)
        return 2
    queue, tasks = slurm.queued(args.checkpoint_dir), []
    for job in pending:
        state, task = queue.get(job.folder.resolve(), (None, None))
        if state:
            print(f"skipped {job.folder}: already in the queue ({state.lower()} as {task})")
        elif slurm.locked(job.folder):
            print(f"skipped {job.folder}: a training holds it now (its .lock)")
        else:
            tasks.append((job.folder, job.new_run))
    if not tasks:
        print(f"nothing to submit: {len(pending)} run(s) need work"
              + (", all queued or running" if pending else ""))
        return 0
    folder = Path(args.checkpoint_dir) / "slurm"
    resources = slurm.Resources(args.partition, args.gpus_per_task, args.cpus_per_task, args.time,
                                args.warning, args.max_requeues,
                                [o if o.startswith("-") else f"--{o}" for o in args.sbatch])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / time.strftime(f"campaign-%Y%m%d-%H%M%S-{os.getpid()}.sbatch")
        path.write_text(slurm.script(tasks, resources, Path.cwd(), folder.resolve(),
                                     trainer_command(), args.training))
    except OSError as e:
        print(f"error: cannot write the campaign script in {folder}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {len(tasks)} array task(s), one run each")
    if not args.submit:
        print(f"submit it with: sbatch {shlex.quote(str(path))}")
        return 0
    try:
        job = slurm.submit(path.resolve())
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"submitted as array job {job}; its state: squeue --me -n {slurm.JOB_NAME}, or this "
          f"command without --slurm; each run's log: slurm.log in its folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
