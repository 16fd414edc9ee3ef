"""Writes pil_colour_reference.json: torchvision's PIL colour ops on a small image.

Not part of the build; rerun by hand (venv python with torchvision 0.26 + pillow 13) if the
reference versions change. The Rust test `colour_ops_match_torchvision_on_pil_exactly` reads it.
"""

import json

import numpy as np
import PIL
import torchvision
import torchvision.transforms.functional as F
from PIL import Image

rng = np.random.default_rng(3)
h, w = 24, 32
src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
src[:8] = src[:8] // 16 * 16  # some flat, gray-ish and saturated areas too
src[8:12, :, 1] = src[8:12, :, 0]
img = Image.fromarray(src)

ops = []
for name, fn, factors in [
    ("brightness", F.adjust_brightness, [0.6, 0.8731, 1.0, 1.2519, 1.4]),
    ("contrast", F.adjust_contrast, [0.6, 0.9377, 1.3391]),
    ("saturation", F.adjust_saturation, [0.8, 0.9012, 1.1843, 1.2]),
    ("hue", F.adjust_hue, [-0.1, -0.0371, 0.0, 0.002, 0.0642, 0.1]),
]:
    for f in factors:
        f = float(np.float32(f))  # torchvision draws factors as float32
        out = np.asarray(fn(img, f))
        ops.append({"op": name, "factor": f, "out": out.tobytes().hex()})

with open("pil_colour_reference.json", "w") as fh:
    json.dump({"pillow": PIL.__version__, "torchvision": torchvision.__version__, "width": w, "height": h,
               "source": src.tobytes().hex(), "ops": ops}, fh)
