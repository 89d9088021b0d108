"""A run's TensorBoard folder, runs/<net>_<att>/<run>/: its name (unique where two run folders
would share one), the .owner file that ties it to its run folder, the repair of its event files
when a run resumes from an earlier checkpoint, and TensorBoard's writer thread kept quiet on a full
disk (run_folder.RunFolder writes the log and says so in one line)."""
import hashlib
import json
import sys
import threading
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

import utils

OWNER = ".owner"  # in a TensorBoard folder: the run it belongs to, {"run_id", "folder", "logs"}


def log_name(ckpt_dir: Path, args) -> str:
    """The TensorBoard folder's name: the run folder's, made unique (a hash of its path) when the
    run folder is not in a <net>_<att>/ folder (a copy elsewhere that kept the original's name), or
    when that TensorBoard folder belongs to another run (the same run name in another
    --checkpoint-dir). A folder belongs to the run folder its .owner names (this folder's earlier
    attempt), or to a run of its run id whose folder moved; a folder from before .owner to a resumed
    run, not to a new one."""
    unique = f"{ckpt_dir.name}-{hashlib.sha1(str(ckpt_dir.resolve()).encode()).hexdigest()[:6]}"
    if ckpt_dir.parent.name != f"{args.net}_{args.att}":
        return unique
    logs = Path(args.log_dir) / ckpt_dir.parent.name / ckpt_dir.name
    try:
        owner = json.loads((logs / OWNER).read_text())
    # from before .owner: a resumed run's own; a new run does not take its logs
    except (OSError, ValueError):
        taken = any(path.is_file() for path in logs.glob("events.out.tfevents.*"))
        return unique if not args.resume and taken else ckpt_dir.name
    if not isinstance(owner, dict) or owner.get("folder") == str(ckpt_dir.resolve()):
        return ckpt_dir.name
    # The same run id: this run and its logs copied or moved together (the .owner names other logs),
    # or this run moved here (its old folder is gone); not a copy of the run beside the original.
    same_run = owner.get("run_id") == args.run_id
    copied_with_logs = owner.get("logs") != str(logs.resolve())
    moved = not (Path(str(owner.get("folder"))) / "last.pth").exists()
    return ckpt_dir.name if same_run and (copied_with_logs or moved) else unique


def forget_events_after(log_dir: Path, epoch: int) -> set:
    """Remove from the event files what an interrupted process logged after the checkpoint being
    resumed (epoch), and the final metrics of a finished run being extended: TensorBoard's own
    reader (load_fast=false) ignores SummaryWriter's purge_step and would show those steps twice.
    Returns the (tag, epoch) of the scalars the files still hold."""
    logged = set()
    for leftover in [*log_dir.glob(".rewrite-*.tmp"), *log_dir.glob("*tfevents*.tmp")]:
        if leftover.is_file():
            leftover.unlink()  # a rewrite that a kill interrupted
    for path in event_files(log_dir):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [
            record for record in records if _still_valid(event_pb2.Event.FromString(record), epoch)]
        logged |= {(value.tag, event.step) for event in map(event_pb2.Event.FromString, kept)
                   for value in event.summary.value}
        if len(kept) <= 1:  # the file's header alone: a start that was killed before it logged
            path.unlink()
        elif len(kept) < len(records):
            # The temporary file's name without "tfevents": TensorBoard reads every such file.
            utils.write_atomic(path, lambda f: _write_records(f, kept), tmp=rewrite_file(path))
    return logged


def event_files(log_dir: Path) -> list[Path]:
    """The log folder's event files. Anything else named like one (a folder, a FIFO) is left
    alone, with one line."""
    files = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        if path.is_file():
            files.append(path)
        elif not path.name.endswith(".tmp"):
            print(f"note: {path} is named like a TensorBoard event file but is not a file: left "
                  f"alone", file=sys.stderr)
    return files


def _still_valid(event, epoch: int) -> bool:
    final_metrics = any(value.tag.startswith(("hparam/",
                                              "_hparams_/")) for value in event.summary.value)
    return event.step <= epoch and not final_metrics


def rewrite_file(events: Path) -> Path:
    """The temporary file an event file is rewritten into: no "tfevents" in its name, which
    TensorBoard would read as one more event file."""
    return events.with_name(f".rewrite-{hashlib.sha1(events.name.encode()).hexdigest()[:12]}.tmp")


def _write_records(file, records):
    writer = RecordWriter(file)
    for record in records:
        writer.write(record)


def quiet_log_thread_errors() -> None:
    """TensorBoard's writer thread dies with a traceback on a failed write (a full disk); the next
    write raises it again, and RunFolder._log says it in one line: the thread's traceback goes."""
    previous = threading.excepthook
    if getattr(previous, "quiet_log_thread", False):
        return

    def hook(thread_error):
        writer_thread = type(thread_error.thread).__name__ == "_AsyncWriterThread"
        if not (writer_thread and isinstance(thread_error.exc_value, OSError)):
            previous(thread_error)

    hook.quiet_log_thread = True
    threading.excepthook = hook
