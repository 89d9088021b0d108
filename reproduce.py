"""The commands that reproduce every row of the paper's CIFAR-100 table, N seeds each.

    python reproduce.py --seeds 3                        # print them (nothing runs)
    python reproduce.py --seeds 3 --run                  # run them one after another
    python reproduce.py --seeds 3 --gpus 0,1,2,3 --run   # one run per GPU at a time

Rerunning it is safe: finished runs are skipped and interrupted ones resumed, because each run has
a fixed folder, checkpoint/<net>_<att>/<recipe>-seed<S>/. A folder that cannot be read is skipped
with one line saying why. Then `python table.py`.
"""
import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import cli
import run_records
from conf import settings

# Every row of the paper's table that has a public definition (SSA has none).
ROWS = [(net, att) for net, att, *_ in settings.PAPER_TABLE if att != "ssa"]


@dataclass
class Job:
    net: str
    att: str
    recipe: str
    seed: int
    folder: Path
    state: str  # "new", "interrupted", "done" or "skipped" (unreadable)
    command: list

    def shell(self, gpu=None) -> str:
        prefix = f"CUDA_VISIBLE_DEVICES={gpu} " if gpu is not None else ""
        return prefix + " ".join(self.command)


def run_state(folder: Path) -> str:
    if not (folder / "last.pth").is_file():
        return "new"
    if not (folder / "metrics.csv").is_file():
        return "interrupted"  # stopped within its first epoch
    try:
        return "done" if run_records.read_run(folder).finished else "interrupted"
    except run_records.UnreadableRun as e:
        print(f"skipped {folder}: {e}", file=sys.stderr)
        return "skipped"


def plan(args) -> list[Job]:
    jobs = []
    for recipe in args.recipe:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for net, att in ROWS:
                name = f"{recipe}-seed{seed}"
                folder = Path(args.checkpoint_dir) / f"{net}_{att}" / name
                state = run_state(folder)
                command = [sys.executable if args.run else "python", "train_cifar100.py"]
                if state == "interrupted":
                    command += ["--resume", str(folder)]
                else:
                    command += ["-net", net, "-att", att, "--recipe", recipe, "--seed", str(seed), "--run-name", name,
                                "--checkpoint-dir", args.checkpoint_dir]
                    if args.data:
                        command += ["--data", args.data]
                jobs.append(Job(net, att, recipe, seed, folder, state, command))
    return jobs


# The exit codes of a job asked to stop: 128 + the signal where it handled it, minus the signal where
# it was killed by it (a crash, e.g. SIGSEGV, is a failure like any other and the queue goes on).
STOP_CODES = {code for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) for code in (128 + sig, -sig)}


def run_all(jobs: list[Job], gpus: list) -> tuple[int, int]:
    """Run the jobs, one per GPU at a time (or one at a time without --gpus), until they are done or
    one is stopped by a signal; (jobs started, jobs that failed)."""
    todo = queue.Queue()
    for job in jobs:
        todo.put(job)
    started, failed, stop = [], [], threading.Event()

    def worker(gpu):
        while not stop.is_set():
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            print(f"start: {job.shell(gpu)}", flush=True)
            started.append(job)
            code = subprocess.run(job.command, env=env).returncode
            print(f"{'done' if code == 0 else f'exit {code}'}: {job.folder}", flush=True)
            if code:
                failed.append(job)
            if code in STOP_CODES:  # start nothing more
                stop.set()

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in (gpus or [None])]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:  # the running jobs got the Ctrl-C too: they save and stop
        stop.set()
        for t in threads:
            t.join()
    return len(started), len(failed)


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
    p.add_argument("--gpus", type=gpu_ids, default=[], help="comma-separated GPU ids, one run on each at a time")
    p.add_argument("--data", default=None, help="passed on to train_cifar100.py")
    p.add_argument("--checkpoint-dir", default=settings.CHECKPOINT_DIR)
    p.add_argument("--run", action="store_true", help="run the commands instead of printing them")
    args = p.parse_args(argv)

    jobs = plan(args)
    pending = [job for job in jobs if job.state in ("new", "interrupted")]
    if not args.run:
        for job in jobs:
            gpu = args.gpus[pending.index(job) % len(args.gpus)] if args.gpus and job in pending else None
            if job.state == "done":
                print(f"# {job.net} + {job.att}, {job.recipe}, seed {job.seed}: done")
            elif job.state != "skipped":  # its warning is above
                print(job.shell(gpu) + ("   # resumes" if job.state == "interrupted" else ""))
        count = lambda state: sum(job.state == state for job in jobs)
        skipped = f", {count('skipped')} skipped" if count("skipped") else ""
        print(f"# {len(jobs)} runs: {count('done')} done, {count('interrupted')} to resume, {count('new')} to start"
              f"{skipped}", file=sys.stderr)
        return 0
    started, failed = run_all(pending, args.gpus)
    unstarted = f"; {len(pending) - started} not started (rerun this command to continue)" if started < len(pending) else ""
    print(f"{started - failed} of {len(pending)} runs ended well{unstarted}; then: python table.py")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
