"""Compile EMA's Triton kernels (models/attention/ema_fused.py) for NVIDIA GPUs on a machine without
one, and check what a compiler can say about them before any GPU runs them: every kernel, at the
blocks of every EMA input shape of the networks asked for, for each input dtype and GPU target,
compiled by Triton and assembled by the ptxas Triton ships (`ptxas -v`): registers a thread (at
most --max-registers), spill stores and loads (none), shared memory (within the target's limit)
and the time to compile (under --max-seconds). Exit 0 when every row passes, 1 otherwise.

    python tests/compile_check.py                          # the whole matrix (a few minutes)
    python tests/compile_check.py --nets resnet50 --dtypes bf16 --targets 86 90

Integer arguments (sizes, strides) are compiled unspecialised: the code for any layout. Needs the
CUDA build of torch (Triton); no GPU, no driver. docs/speed.md holds the table it prints.
"""
import argparse
import collections
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # compiled code, not the interpreter (read as the kernels are defined)
    os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.attention import ema_fused  # noqa: E402

# compute capability: (GPUs, ptxas's name, shared memory a block may use in bytes)
TARGETS = {80: ("A100", "sm_80", 166912), 86: ("RTX 30xx, A10", "sm_86", 101376),
           89: ("RTX 40xx, L4", "sm_89", 101376), 90: ("H100, H200", "sm_90a", 232448)}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
NETS = ("resnet50", "resnet101", "mobilenetv2")
KERNELS = ("_strips_kernel", "_forward_kernel", "_backward_maps_kernel",
           "_backward_channels_kernel", "_backward_input_kernel")
# The flags Triton 3.8 itself runs ptxas with (triton/backends/nvidia/compiler.py, make_cubin)
PTXAS_FLAGS = ("-lineinfo", "-v", "--regAllocOptLevel=2")
INPUT_POINTERS = {"x_ptr", "out_ptr", "go_ptr", "dx_ptr"}  # in the input's dtype, the rest fp32
Row = collections.namedtuple("Row", "kernel blocks warps dtype target registers spill_stores "
                                    "spill_loads shared seconds")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--targets", nargs="+", type=int, choices=list(TARGETS),
                        default=list(TARGETS))
    parser.add_argument("--max-registers", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--all-rows", action="store_true",
                        help="one row per dtype and target, not the worst of them")
    return parser.parse_args(argv)


def ptxas() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_usage(text: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` output."""
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not registers or not spills:
        raise ValueError(f"ptxas -v printed no register or spill count:\n{text}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_kernel(name: str, blocks: tuple, dtype: str, target: int) -> Row:
    """Compile one kernel for one target with the module's launch options, every integer argument
    unspecialised (Triton at run time may make a stride of 1 a constant and mark multiples of 16:
    variants of this code), and read ptxas's counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = getattr(ema_fused, name)
    cb, bh, bw = blocks
    constants = dict(CB=cb, BH=bh, BW=bw, DTYPE=triton.language.float32)
    signature, attrs = {}, {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + (DTYPES[dtype] if arg in INPUT_POINTERS else "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are aligned
        else:
            signature[arg] = "fp32" if arg == "eps" else "i32"
    options = ema_fused.launch_settings(cb, bh, bw, name)  # as the module launches it
    warps = options["num_warps"]
    started = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants,
                                        attrs=attrs),
                              target=GPUTarget("cuda", target, 32),
                              options=options)
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        result = subprocess.run([ptxas(), *PTXAS_FLAGS, f"--gpu-name={TARGETS[target][1]}",
                                 str(ptx), "-o", str(Path(folder, "kernel.o"))],
                                capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"ptxas failed on {name}: {result.stderr.strip()}")
    seconds = time.perf_counter() - started
    return Row(name, blocks, warps, dtype, target, *ptxas_usage(result.stdout + result.stderr),
               compiled.metadata.shared, seconds)


def shapes_by_blocks(nets) -> dict:
    """{blocks: [(net, (C, H, W))...]}: the EMA input shapes of each net (CIFAR's 32x32 images),
    by the kernels' blocks, which is all the compiled code depends on."""
    import torch

    import models
    from training.ema_kernels import ema_inputs
    from training.speed import SpeedSettings
    found = collections.defaultdict(list)
    for net in nets:
        model = models.create_model(net, "ema", 100)
        for item, _ in ema_inputs(model, torch.zeros(1, 3, 32, 32),
                                  SpeedSettings(torch.device("cpu"))):
            blocks = ema_fused.blocks(item.channels // item.groups, item.height, item.width)
            found[blocks].append((net, tuple(item[:3])))
    return found


def failures(row: Row, args) -> list[str]:
    shared_limit = TARGETS[row.target][2]
    return [why for bad, why in (
        (row.registers > args.max_registers, f"{row.registers} registers"),
        (row.spill_stores or row.spill_loads,
         f"spills {row.spill_stores}/{row.spill_loads} bytes"),
        (row.shared > shared_limit, f"{row.shared} bytes shared > {shared_limit}"),
        (row.seconds > args.max_seconds, f"{row.seconds:.1f} s to compile")) if bad]


def table(rows, args) -> list[str]:
    """Markdown: one row per kernel and blocks, the worst over dtypes for each target (or, with
    --all-rows, each dtype apart)."""
    targets = sorted({row.target for row in rows})
    lines = ["| kernel | blocks (channels x H x W) | warps | dtypes | "
             + " | ".join(f"sm_{t}" for t in targets) + " |",
             "|---|---|---|---|" + "---|" * len(targets)]
    groups = collections.defaultdict(list)
    for row in rows:
        groups[(row.kernel, row.blocks, row.warps) + ((row.dtype,) if args.all_rows else ())
               ].append(row)
    for key, members in groups.items():
        cells = []
        for target in targets:
            mine = [row for row in members if row.target == target]
            cells.append(f"{max(r.registers for r in mine)} regs, "
                         f"{max(r.spill_stores + r.spill_loads for r in mine)} B spilled, "
                         f"{max(r.shared for r in mine) / 1024:.1f} KiB shared, "
                         f"{max(r.seconds for r in mine):.1f} s"
                         + ("" if not any(failures(r, args) for r in mine) else " **FAILS**"))
        dtypes = ", ".join(sorted({row.dtype for row in members}))
        lines.append(f"| {key[0].strip('_')} | {'x'.join(map(str, key[1]))} | {key[2]} | "
                     f"{dtypes} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if not ema_fused.available():
        print("Triton is not installed (the CPU build of torch has none): nothing to compile")
        return 2
    by_blocks = shapes_by_blocks(args.nets)
    jobs = [(kernel, blocks, dtype, target) for blocks in by_blocks for kernel in KERNELS
            for dtype in args.dtypes for target in args.targets]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # every kernel compiled afresh: honest times
        with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(compile_kernel, *zip(*jobs)))
    print("EMA input shapes by the kernels' blocks:")
    for blocks, shapes in by_blocks.items():
        print(f"  {'x'.join(map(str, blocks))}: " + ", ".join(
            f"{net} {'x'.join(map(str, shape))}" for net, shape in shapes))
    print()
    print("\n".join(table(rows, args)))
    bad = [(row, failures(row, args)) for row in rows if failures(row, args)]
    for row, why in bad:
        print(f"FAIL {row.kernel} {row.blocks} {row.dtype} sm_{row.target}: {', '.join(why)}")
    print(f"\nresult: {len(rows) - len(bad)} of {len(rows)} compiles pass (at most "
          f"{args.max_registers} registers, no spills, shared memory within each target's limit, "
          f"under {args.max_seconds:g} s each)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
