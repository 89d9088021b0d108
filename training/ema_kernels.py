"""EMA's Triton kernels or its PyTorch path, chosen by measurement on the GPU a run trains on
(--ema-kernel auto, the default; docs/speed.md, "EMA's Triton kernels").

The first time a run trains on a GPU (its name and compute capability, torch, Triton and the
kernels' source: the cache key), each EMA input shape of the model, at the run's batch, dtype and
speed settings, is checked in a child process, so that a fault in a kernel cannot take the run
down: the kernels' output and gradients against the PyTorch path in float64 (within TOLERANCE),
then forward + backward timed both ways as the trainer runs them. At each shape the faster correct
path is taken (ema_fused.CHOSEN, which EMA(fused=None) reads); the verdicts are cached under the
user's cache folder, and the run's header says which path runs where, with the times. A failed
check or a crashed child means the PyTorch path, and the header says why.
"""
import collections
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import torch

from models.attention import EMA, ema_fused
from training.speed import SpeedSettings, timed
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
MODES = ("auto", "triton", "pytorch")
# Relative error (norm of the difference / norm of the float64 reference) allowed in the output and
# every gradient, by the input's dtype: tests/test_gpu.py's tolerances.
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2, "float64": 1e-9}
# Seconds for the child's whole check (it compiles each shape's PyTorch path): under torchrun the
# other ranks wait for it, within the process group's 10 minutes.
CHILD_TIMEOUT = 480
CACHE_NAME = "ema-cifar100"
VERDICT_PREFIX = "verdict "  # the child's lines that carry a verdict (JSON follows)

EmaInput = collections.namedtuple("EmaInput", "channels height width groups dtype")


@dataclasses.dataclass
class Verdict:
    """The check of one EMA input: milliseconds of forward + backward each way, or why the kernels
    may not be used there. Only a lasting verdict is cached: times and a failed comparison, not a
    crash, a hang or an exception (out of memory, say), which the next run checks again."""
    triton_ms: Optional[float] = None
    pytorch_ms: Optional[float] = None
    error: Optional[str] = None
    lasting: bool = True

    @property
    def fused(self) -> bool:
        timed = all(isinstance(ms, (int, float)) for ms in (self.triton_ms, self.pytorch_ms))
        return self.error is None and timed and self.triton_ms < self.pytorch_ms

    @classmethod
    def read(cls, fields) -> "Verdict":
        """From JSON (the child's line, the cache); a ValueError if it is not a verdict."""
        if not isinstance(fields, dict) or not fields.keys() <= {f.name for f in
                                                                   dataclasses.fields(cls)}:
            raise ValueError(f"not a verdict: {fields!r}")
        verdict = cls(**fields)
        if verdict.error is None and not (isinstance(verdict.triton_ms, (int, float))
                                          and isinstance(verdict.pytorch_ms, (int, float))):
            raise ValueError(f"a verdict without its times: {fields!r}")
        return verdict


def ema_inputs(model, images: torch.Tensor, speed: SpeedSettings) -> list:
    """[(EmaInput, how many modules see it)] for a forward of `images` as the trainer runs it (the
    dtype is what autocast hands EMA), in the order the model meets them."""
    seen = collections.Counter()
    hooks = [module.register_forward_hook(
        lambda module, inputs, _: seen.update([EmaInput(*inputs[0].shape[1:], module.groups,
                                                        str(inputs[0].dtype).split(".")[-1])]))
        for module in model.modules() if isinstance(module, EMA)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), speed.autocast():
            model(images)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return list(seen.items())


def ema_shapes(model, size: int = 32) -> list:
    """[((C, H, W), count)]: the EMA input shapes of a model on the CPU, for size x size images."""
    cpu = SpeedSettings(torch.device("cpu"))
    found = ema_inputs(model, torch.zeros(1, 3, size, size), cpu)
    return [((i.channels, i.height, i.width), count) for i, count in found]


def key_of(item: EmaInput, batch: int, speed: SpeedSettings) -> str:
    """A verdict's name in the cache: the input, the batch and how the trainer runs it."""
    return (f"{item.channels}x{item.height}x{item.width} groups {item.groups} {item.dtype} batch "
            f"{batch}, {speed.describe()}")


def machine_key(device: torch.device) -> dict:
    """What a verdict holds for: the GPU, torch, Triton, and the kernels' source."""
    import triton
    capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return {"gpu": torch.cuda.get_device_name(device), "capability": capability,
            "torch": torch.__version__, "triton": triton.__version__,
            "kernels": hashlib.sha256(Path(ema_fused.__file__).read_bytes()).hexdigest()[:16]}


def cache_file(key: dict) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(base) / CACHE_NAME / f"ema-kernels-{name}.json"


def read_cache(path: Path, key: dict) -> dict:
    """{verdict name: Verdict} from the cache file; empty when missing, unreadable or another
    key's."""
    try:
        held = json.loads(path.read_text())
        if held.get("key") != key:
            return {}
        return {name: Verdict.read(fields) for name, fields in held["verdicts"].items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def write_cache(path: Path, key: dict, verdicts: dict) -> Optional[str]:
    """Merge the verdicts into the cache file (temp file, then an atomic replace); why not, or
    None."""
    merged = {**read_cache(path, key), **{name: verdict for name, verdict in verdicts.items()
                                          if verdict.lasting}}
    body = {"key": key, "verdicts": {name: dataclasses.asdict(v) for name, v in merged.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False) as temp:
            json.dump(body, temp, indent=1)
        os.replace(temp.name, path)
    except OSError as e:
        return f"not cached: {e}"
    return None


def measure(items: list, batch: int, speed: SpeedSettings) -> dict:
    """{verdict name: Verdict} for each EmaInput, from a child process: a crash or a hang there
    becomes a verdict against the kernels (for the inputs it had not finished)."""
    request = {"items": [list(item) for item in items], "batch": batch,
               "speed": {**dataclasses.asdict(speed), "device": str(speed.device)}}
    code = ("import sys; from training import ema_kernels; "
            "sys.exit(ema_kernels.child(sys.argv[1]))")
    why = None
    try:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(request)], cwd=ROOT,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        output = done.stdout
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            why = f"the check crashed (exit {done.returncode}: {last[:200]})"
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        why = f"the check did not finish in {CHILD_TIMEOUT} s"
    verdicts = {}
    for line in output.splitlines():
        if line.startswith(VERDICT_PREFIX):
            try:  # a line cut short by a crash is no verdict
                name, fields = json.loads(line[len(VERDICT_PREFIX):])
                verdicts[name] = Verdict.read(fields)
            except (ValueError, TypeError):
                continue
    for item in items:
        verdicts.setdefault(key_of(item, batch, speed),
                            Verdict(error=why or "the check gave no verdict", lasting=False))
    return verdicts


def child(request: str) -> int:
    """The child process: one line per input, `verdict ["<name>", {...}]`, as each is done."""
    request = json.loads(request)
    fields = request["speed"]
    speed = SpeedSettings(**{**fields, "device": torch.device(fields["device"])})
    for item in map(lambda fields: EmaInput(*fields), request["items"]):
        verdict = check(item, request["batch"], speed)
        print(VERDICT_PREFIX + json.dumps([key_of(item, request["batch"], speed),
                                           dataclasses.asdict(verdict)]), flush=True)
    return 0


def check(item: EmaInput, batch: int, speed: SpeedSettings) -> Verdict:
    """The kernels against float64, then both paths timed; an exception is a verdict too."""
    dtype = getattr(torch, item.dtype)
    shape = (batch, item.channels, item.height, item.width)
    try:
        errors = relative_errors(shape, item.groups, dtype, speed.device)
        worst = max(errors, key=errors.get)
        if errors[worst] > TOLERANCE[item.dtype]:
            return Verdict(error=f"{worst} off by {errors[worst]:.1e} (relative; allowed "
                                 f"{TOLERANCE[item.dtype]:.0e})")
        ms = {path: ema_step_ms(shape, speed, 3, 10, fused=path == "triton", groups=item.groups,
                                dtype=dtype) for path in ("triton", "pytorch")}
        return Verdict(triton_ms=ms["triton"], pytorch_ms=ms["pytorch"])
    except Exception as e:  # noqa: BLE001  (any failure of the kernels is a verdict against them)
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Verdict(error=f"{type(e).__name__}: {str(e)[:200]} ({Path(where.filename).name}:"
                             f"{where.lineno})", lasting=False)


def relative_errors(shape, groups: int, dtype: torch.dtype, device) -> dict:
    """{output, input gradient, each parameter's gradient: relative error} of the kernels against
    the PyTorch path in float64, with random weights (a unit scale or a zero bias hides terms)."""
    torch.manual_seed(0)
    fused = EMA(shape[1], groups, fused=True).to(device)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.5)
    reference = EMA(shape[1], groups, fused=False).to(device).double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    results = []
    for module, inputs, g in ((fused, x, grad), (reference, x.double(), grad.double())):
        inputs = inputs.detach().clone().requires_grad_()
        out = module(inputs)
        out.backward(g)
        results.append({"output": out, "input's gradient": inputs.grad,
                        **{f"{name}'s gradient": p.grad for name, p in module.named_parameters()}})
    return {name: ((results[0][name].double() - want).norm() / want.norm()).item()
            for name, want in results[1].items()}


def ema_step_ms(shape, speed: SpeedSettings, warmup: int, repeats: int, fused: bool = False,
                groups: int = 32, dtype=None) -> float:
    """Milliseconds of one EMA's forward + backward on an input of `shape`, run the way the trainer
    runs the model (autocast, layout, compile, CUDA graphs), with a bf16/fp16 input under autocast
    as a block's last BatchNorm hands it over (or `dtype`)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # each shape compiled on its own, within dynamo's recompile limit
    module = EMA(shape[1], groups, fused=fused).to(speed.device)
    speed.enable_fast_kernels()
    step = speed.compiled(module)
    x = torch.randn(shape, device=speed.device, dtype=dtype or speed.amp_dtype or torch.float32)
    x = x.contiguous(memory_format=speed.memory_format)
    x.requires_grad_()
    grad = torch.randn_like(x)

    def forward_backward():
        # Freed before each forward as in engine.train_step: a gradient accumulated across replays
        # would read a CUDA-graph output that the next replay overwrites.
        module.zero_grad(set_to_none=True)
        x.grad = None
        with speed.autocast():
            out = step(x)
        out.backward(grad)

    _, seconds = timed(forward_backward, speed.device, warmup, repeats)
    return seconds * 1e3


def choose(model, images, mode: str, speed: SpeedSettings, batch: int, processes) -> list:
    """Set how the model's EMA modules run, by --ema-kernel; the run header's line about it, if any
    (none without EMA, nor with auto where the kernels cannot run: the PyTorch path, as always).
    images() gives an input batch, asked for only when the EMA inputs' shapes are needed."""
    modules = [module for module in model.modules() if isinstance(module, EMA)]
    if not modules:
        return []
    if mode != "auto":
        if mode == "triton":  # before any module is switched: the probe runs the PyTorch path
            for item, _ in ema_inputs(model, images(), speed):
                why = unsupported(item, speed)
                if why:
                    raise UserError(f"--ema-kernel triton: {why}")
        for module in modules:
            module.fused = mode == "triton"
        path = "Triton kernels" if mode == "triton" else "PyTorch path"
        return [f"EMA: the {path} (--ema-kernel {mode})"]
    if speed.device.type != "cuda":
        return []
    if not ema_fused.available():
        return ["EMA: the PyTorch path (this torch has no Triton for the kernels)"]
    speed.enable_fast_kernels()  # --deterministic's cuBLAS setting before the probe's first matmul
    found = ema_inputs(model, images(), speed)
    cannot = {key_of(item, batch, speed): Verdict(error=f"they cannot run here: {why}",
                                                  lasting=False)
              for item, why in ((item, unsupported(item, speed)) for item, _ in found) if why}
    verdicts, how = cached_or_measured(
        [item for item, _ in found if key_of(item, batch, speed) not in cannot], batch, speed,
        processes)
    verdicts.update(cannot)
    for item, _ in found:
        ema_fused.CHOSEN[tuple(item)] = verdicts[key_of(item, batch, speed)].fused
    return [header_line(found, verdicts, batch, speed, how)]


def unsupported(item: EmaInput, speed: SpeedSettings) -> Optional[str]:
    """Why the kernels cannot run on this input (a map too large, say), or None."""
    probe = torch.empty((1,) + tuple(item[:3]), device="meta", dtype=getattr(torch, item.dtype))
    return ema_fused.unsupported(probe, item.groups, speed.device.type)


def cached_or_measured(items, batch, speed, processes) -> tuple[dict, str]:
    """The verdicts for these inputs, from the cache or measured now. Under torchrun the main
    process measures while the others wait, then they read its verdicts; where it could not cache
    one, they take the PyTorch path there rather than measure on their own."""
    key = machine_key(speed.device)
    path = cache_file(key)
    if processes.enabled and not processes.main:
        processes.barrier()  # the main process measures first
        verdicts = read_cache(path, key)
        return {key_of(item, batch, speed): verdicts.get(
            key_of(item, batch, speed), Verdict(error="not measured on this rank", lasting=False))
            for item in items}, f"the main process's verdicts, {path}"
    verdicts = read_cache(path, key)
    missing = [item for item in items if key_of(item, batch, speed) not in verdicts]
    how = f"cached in {path}"
    try:
        if missing:
            verdicts.update(measure(missing, batch, speed))
            how = (f"measured now on this GPU for {len(missing)} of {len(items)} shapes, "
                   + (write_cache(path, key, verdicts) or f"cached in {path}"))
    finally:
        if processes.enabled:  # reached however the measurement ends: no rank waits forever
            processes.barrier()
    return verdicts, how


def header_line(found, verdicts: dict, batch: int, speed: SpeedSettings, how: str) -> str:
    """One line: which path runs at each EMA input, with the times (forward + backward)."""
    cells, fused = [], 0
    for item, _ in found:
        verdict = verdicts[key_of(item, batch, speed)]
        shape = f"{item.channels}x{item.height}x{item.width}"
        if verdict.error:
            cells.append(f"{shape} PyTorch (not the kernels: {verdict.error})")
            continue
        fused += verdict.fused
        cells.append(f"{shape} {'Triton' if verdict.fused else 'PyTorch'} "
                     f"({verdict.triton_ms:.3f} ms Triton, {verdict.pytorch_ms:.3f} ms PyTorch)")
    return (f"EMA: the Triton kernels at {fused} of {len(found)} input shapes, the faster correct "
            f"path at each ({found[0][0].dtype}, batch {batch}; {how}): " + "; ".join(cells))
