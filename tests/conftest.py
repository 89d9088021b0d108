"""The suite runs on the CPU even where CUDA exists: bitwise resume, the two-process torchrun test
and the tiny datasets assume it. CUDA stays visible only with EMA_TEST_GPU=1, for tests/test_gpu.py
(README "One GPU check")."""
import os

if os.environ.get("EMA_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA initialises, after this
