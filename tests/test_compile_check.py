"""tests/compile_check.py: EMA's Triton kernels compiled for GPUs without one. The suite runs the
part of the matrix that fits its time (ResNet50's four EMA shapes in bf16, for sm_86 and sm_90:
40 compiles, about 11 s on two cores); `python tests/compile_check.py` runs all of it (240).
Skipped, with the reason, where Triton or its ptxas is absent."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compile_check
from models.attention import ema_fused

pytestmark = pytest.mark.skipif(not ema_fused.available(),
                                reason="Triton is not installed (the CPU build of torch)")
ROOT = Path(__file__).resolve().parents[1]


def test_resnet50_in_bf16_compiles_for_sm86_and_sm90_without_spills():
    if not os.path.exists(compile_check.ptxas()):
        pytest.skip(f"Triton's ptxas is not at {compile_check.ptxas()}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_check.py"), "--nets",
                           "resnet50", "--dtypes", "bf16", "--targets", "86", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: 40 of 40 compiles pass (at most 128 registers, no spills" in done.stdout
    rows = [line for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| kernel |")]
    assert len(rows) == 5 * 4  # five kernels at ResNet50's four blocks
    for blocks in ("1x32x32", "2x16x16", "8x8x8", "32x4x4"):
        assert sum(f"| {blocks} |" in row for row in rows) == 5
    assert all(row.count("0 B spilled") == 2 and "FAILS" not in row for row in rows)


def test_the_limits_fail_a_row():
    row = compile_check.Row("_forward_kernel", (8, 8, 8), 4, "bf16", 86, 128, 0, 0, 512, 0.5)
    args = compile_check.parse_args([])
    assert compile_check.failures(row, args) == []
    assert compile_check.failures(row._replace(registers=130), args) == ["130 registers"]
    assert compile_check.failures(row._replace(spill_loads=4), args) == ["spills 0/4 bytes"]
    assert compile_check.failures(row._replace(shared=101377), args) == [
        "101377 bytes shared > 101376"]
    assert compile_check.failures(row._replace(target=90, shared=101377), args) == []
    assert compile_check.failures(row._replace(seconds=31), args) == ["31.0 s to compile"]


def test_ptxas_output_is_read():
    text = ("ptxas info    : Function properties for _forward_kernel\n"
            "    24 bytes stack frame, 32 bytes spill stores, 20 bytes spill loads\n"
            "ptxas info    : Used 80 registers, used 1 barriers, 24 bytes cumulative stack size")
    assert compile_check.ptxas_usage(text) == (80, 32, 20)
    with pytest.raises(ValueError, match="no register or spill count"):
        compile_check.ptxas_usage("ptxas fatal")
