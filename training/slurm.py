"""reproduce.py's campaigns on a SLURM cluster (docs/reproducing.md, "On a SLURM cluster"): one
job-array script a person can read and edit (one array task a run), its submission, and what the
queue holds. Torch-free.

What a task does, in the script itself: it appends its output to slurm.log in its run folder,
starts the run (a resume if the folder holds a last.pth, so a requeued task continues from it,
whatever job it is now) as a job step (srun), so that SLURM's warning before the time limit, a
preemption's SIGTERM and `scancel --signal=TERM` reach the training process; the run saves
last.pth and exits 143, and the task requeues itself, that array task only (<array job>_<task>), at
most --max-requeues times. A finished run exits 0; a failed one (exit 1 or 2) is not requeued.
"""
import fcntl
import json
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

JOB_NAME = "ema-cifar100"
LOG = "slurm.log"  # in each run folder, appended across requeues
STOPPED = (143, 130, 129)  # the trainer saved and stopped on SIGTERM, SIGINT, SIGHUP
TASK_LINE = re.compile(r"^\s*(\d+)\)\s+folder=(.+?)\s*$")


@dataclass
class Resources:
    """What each array task asks SLURM for, and how it is requeued."""
    partition: str = None
    gpus: int = 1  # per task; more than one: torchrun --standalone inside the task
    cpus: int = None  # per task
    time: str = None  # SLURM's format, e.g. 4:00:00 or 2-00:00:00
    warning: int = 300  # seconds before the limit at which the run is told to save and stop
    max_requeues: int = 10
    sbatch: list = field(default_factory=list)  # more #SBATCH options, as given


def available() -> bool:
    return shutil.which("sbatch") is not None


def script(tasks: list, resources: Resources, root: Path, logs: Path, python: list,
           passed: list) -> str:
    """The job-array script for tasks [(run folder, the new run's arguments)], run from root (the
    folders are relative to it) with the python command given (the trainer's path included) and
    the options passed to every run; SLURM's own output (what a task prints before its run's
    log opens) in logs."""
    if not tasks:
        raise ValueError("a campaign script needs at least one task")
    launch = python
    if resources.gpus > 1:
        launch = [python[0], "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={resources.gpus}"] + python[1:]
    options = [f"--job-name={JOB_NAME}", f"--array=0-{len(tasks) - 1}",
               f"--output={json.dumps(str(logs / 'slurm-%A_%a.out'))}", "--open-mode=append",
               "--requeue", f"--signal=TERM@{resources.warning}"]
    options += [f"--partition={resources.partition}"] if resources.partition else []
    options += [f"--gpus-per-task={resources.gpus}"] if resources.gpus else []
    options += [f"--cpus-per-task={resources.cpus}"] if resources.cpus else []
    options += [f"--time={resources.time}"] if resources.time else []
    options += resources.sbatch
    cases = "\n".join(f"  {number}) folder={shlex.quote(str(folder))}\n"
                      f"     new=({shlex.join(arguments)}) ;;"
                      for number, (folder, arguments) in enumerate(tasks))
    return TEMPLATE.format(
        count=len(tasks), sbatch="\n".join(f"#SBATCH {o}" for o in options),
        max_requeues=resources.max_requeues, root=shlex.quote(str(root)), cases=cases,
        passed=shlex.join(passed), launch=shlex.join(launch), log=LOG,
        stopped="|".join(map(str, STOPPED)), written=time.strftime("%Y-%m-%d %H:%M"))


TEMPLATE = """#!/bin/bash
# EMA on CIFAR-100: {count} run(s), one array task each (reproduce.py --slurm, {written}).
# Submit: sbatch THIS_FILE. Edit the #SBATCH lines for your site (account, QOS, constraints).
# Each task appends to slurm.log in its run folder. Before the time limit (or on a preemption,
# or `scancel --signal=TERM JOB_TASK`) the run saves last.pth and exits ({stopped}); the task
# then requeues itself, that task only, at most MAX_REQUEUES times, and resumes the run from its
# folder.
{sbatch}
set -u
MAX_REQUEUES={max_requeues}
cd {root} || exit 2
case $SLURM_ARRAY_TASK_ID in
{cases}
  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;
esac
passed=({passed})
mkdir -p "$folder"
exec >> "$folder/{log}" 2>&1
export TQDM_MININTERVAL=60  # the progress bar in a log file: once a minute
task=${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}
restarts=${{SLURM_RESTART_COUNT:-0}}
echo "== $(date '+%F %T') task $task (job $SLURM_JOB_ID) on $(hostname -s)," \\
     "requeued $restarts time(s)"
if [ -f "$folder/last.pth" ]; then  # started before: continue it, whichever job this is
  set -- --resume "$folder" "${{passed[@]}}"
else
  set -- "${{new[@]}}" "${{passed[@]}}"
fi
srun --ntasks=1 ${{SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}} {launch} "$@"
code=$?
case $code in
  0) echo "== $(date '+%F %T') finished" ;;
  {stopped})
    if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
      echo "== $(date '+%F %T') stopped by a signal (exit $code), last.pth saved: requeued"
      scontrol requeue "$task" && exit 0
      echo "== scontrol requeue $task failed: resubmit the campaign to continue"
    else
      echo "== $(date '+%F %T') stopped (exit $code) after $MAX_REQUEUES requeues: not" \\
           "requeued again (a run that cannot finish within the limit?); resubmit to continue"
    fi ;;
  *) echo "== $(date '+%F %T') failed (exit $code): not requeued; the lines above say why" ;;
esac
exit $code
"""


def submit(path: Path) -> str:
    """sbatch the script; the array job's id, or a RuntimeError with sbatch's message."""
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"sbatch {path} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def queued(checkpoint_dir) -> dict:
    """{run folder (resolved): (state, '<job>_<task>')} for this user's campaign tasks in the queue,
    from squeue and the scripts they run (each names its tasks' folders); {} without squeue, or
    where no campaign script was ever written under checkpoint_dir (squeue is not even asked: a
    machine with SLURM's client but no controller to answer makes it wait)."""
    if not shutil.which("squeue") or not any((Path(checkpoint_dir) / "slurm").glob("*.sbatch")):
        return {}
    try:
        done = subprocess.run(["squeue", "-h", "-r", "--me", "-n", JOB_NAME, "-o", "%i|%T|%o"],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:  # a controller that does not answer: nothing known
        return {}
    found, folders_of = {}, {}
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        task, state, command = line.split("|", 2)
        if "_" not in task:
            continue
        if command not in folders_of:
            folders_of[command] = task_folders(Path(command))
        folder = folders_of[command].get(int(task.rsplit("_", 1)[1]))
        if folder is not None:
            found[folder] = (state, task)
    return found


def task_folders(path: Path) -> dict:
    """{array task: run folder (resolved)} from a campaign script; {} where it cannot be read."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    root = re.search(r"^cd (.+?) \|\| exit 2$", text, re.MULTILINE)
    base = Path(shlex.split(root.group(1))[0]) if root else path.parent
    return {int(m.group(1)): (base / shlex.split(m.group(2))[0]).resolve()
            for m in map(TASK_LINE.match, text.splitlines()) if m}


def locked(folder: Path) -> bool:
    """Whether a training holds the run folder's lock now (training/run_folder.py's RunLock)."""
    try:
        with open(folder / ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
