"""Reference side of the loader benchmark: the official DINOv2 augmentation (torchvision + PIL).

The transform below is built the way dinov2/data/augmentations.py builds DataAugmentationDINO
(same torchvision transforms, parameters and order, including its GaussianBlur wrapper that
passes 1 - p to RandomApply), so the work per image is the reference's.

  official.py gen DIR N [SEED]      write N photo-like JPEGs (quality 90, 4:2:0) to DIR
  official.py decode DIR            PIL decode throughput (Image.open(..).convert("RGB"))
  official.py loader DIR [--batch-size B] [--batches K] [--local-crops L]
                                    images/s of decode + multi-crop + collate, one thread
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms


def blur(p):
    # dinov2.data.transforms.GaussianBlur: RandomApply with keep_p = 1 - p.
    return transforms.RandomApply([transforms.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=1 - p)


def dino_transform(local_crops_number, global_size=224, local_size=96):
    bicubic = transforms.InterpolationMode.BICUBIC
    geo_global = transforms.Compose([
        transforms.RandomResizedCrop(global_size, scale=(0.32, 1.0), interpolation=bicubic),
        transforms.RandomHorizontalFlip(p=0.5),
    ])
    geo_local = transforms.Compose([
        transforms.RandomResizedCrop(local_size, scale=(0.05, 0.32), interpolation=bicubic),
        transforms.RandomHorizontalFlip(p=0.5),
    ])
    jitter = transforms.Compose([
        transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ])
    normalize = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    g1 = transforms.Compose([jitter, blur(1.0), normalize])
    g2 = transforms.Compose([jitter, blur(0.1), transforms.RandomSolarize(threshold=128, p=0.2), normalize])
    loc = transforms.Compose([jitter, blur(0.5), normalize])

    def apply(img):
        globals_ = [g1(geo_global(img)), g2(geo_global(img))]
        locals_ = [loc(geo_local(img)) for _ in range(local_crops_number)]
        return globals_, locals_

    return apply


def jpegs(d):
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".jpg"))
    if not files:
        sys.exit(f"no .jpg files in {d}")
    return files


def gen(d, n, seed):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(320, 640)), int(rng.integers(240, 500))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, ph = rng.uniform(0.005, 0.05), rng.uniform(0.005, 0.05), rng.uniform(0, 6.3)
            img[..., c] = 127 + 90 * np.sin(fx * x + ph) * np.cos(fy * y)
        img += rng.normal(0, 12, img.shape)  # texture, so entropy decoding does real work
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def decode(d):
    files = jpegs(d)
    blobs = [open(f, "rb").read() for f in files]
    import io

    cpu0 = time.process_time()
    for _ in range(3):
        for b in blobs:
            Image.open(io.BytesIO(b)).convert("RGB")
    n = 3 * len(blobs)
    print(json.dumps({"side": "python", "what": "decode", "decoder": "PIL (libjpeg-turbo)", "images": n,
                      "images_per_cpu_second": n / (time.process_time() - cpu0)}))


def loader(d, batch_size, batches, local_crops):
    torch.set_num_threads(1)
    files = jpegs(d)
    transform = dino_transform(local_crops)

    def batch(k):
        out = []
        for i in range(batch_size):
            with open(files[(k * batch_size + i) % len(files)], "rb") as f:
                img = Image.open(f).convert("RGB")  # torchvision's pil_loader
            out.append(transform(img))
        # The collate of dinov2 (collate_data_and_cast): crop-major stacks.
        g = torch.stack([s[0][c] for c in range(2) for s in out])
        loc = torch.stack([s[1][c] for c in range(local_crops) for s in out]) if local_crops else None
        return g, loc

    batch(0)  # warm-up, like the Rust side
    t, cpu0 = time.perf_counter(), time.process_time()
    for k in range(1, batches + 1):
        batch(k)
    secs, cpu = time.perf_counter() - t, time.process_time() - cpu0
    n = batches * batch_size
    # CPU time of the process (all threads): on a shared machine wall time measures the neighbours.
    print(json.dumps({"side": "python", "what": "loader", "workers": 1, "images": n, "wall_seconds": secs,
                      "cpu_seconds": cpu, "images_per_s": n / secs, "images_per_cpu_second": n / cpu}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("dir")
    g.add_argument("n", type=int)
    g.add_argument("seed", type=int, nargs="?", default=0)
    sub.add_parser("decode").add_argument("dir")
    lo = sub.add_parser("loader")
    lo.add_argument("dir")
    lo.add_argument("--batch-size", type=int, default=16)
    lo.add_argument("--batches", type=int, default=10)
    lo.add_argument("--local-crops", type=int, default=8)
    a = p.parse_args()
    if a.cmd == "gen":
        gen(a.dir, a.n, a.seed)
    elif a.cmd == "decode":
        decode(a.dir)
    else:
        loader(a.dir, a.batch_size, a.batches, a.local_crops)


if __name__ == "__main__":
    main()
