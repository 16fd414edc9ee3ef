"""Runs ../shared/bench/official_dinov2_step.py (the official DINOv2 step timer) unchanged on a
GPU, with xformers_stub.py standing in for xFormers when no xformers package is importable
(or when XFORMERS_STUB=1): the device call's carry (64 MiB) has no room for the xformers
wheel. Arguments after the timer's path go to the timer.

    python3 official_gpu.py TIMER --ref .ref --config vitl14 --batch 32 --steps 20 --warmup 5
"""
import importlib.util
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("XFORMERS_STUB") == "1" or importlib.util.find_spec("xformers") is None:
    import xformers_stub

    xformers_stub.install()
    print("official_gpu.py: xFormers stand-in (bench/official/xformers_stub.py)", file=sys.stderr)
timer = sys.argv[1]
sys.argv = [timer] + sys.argv[2:]
runpy.run_path(timer, run_name="__main__")
