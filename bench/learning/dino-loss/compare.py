#!/usr/bin/env python3
"""Lays Dinoflow's loss curve (a run's metrics.jsonl) beside the reference's (the CSV of
reference_run.py): writes one CSV with both and prints a small text table.

    python3 compare.py OURS/metrics.jsonl reference.csv curves.csv [--prototypes 256]

`dino` is dino_local_crops_loss + dino_global_crops_loss: with 2 global and n local crops the
two are normalised by the same number of terms, so their sum is the mean cross-entropy between
teacher targets and student predictions, ln(K) when both are uniform over the K prototypes.
"""

import argparse
import csv
import json
import math

LOSSES = ["dino", "ibot_loss", "koleo_loss"]


def ours(path):
    rows = {}
    for line in open(path):
        e = json.loads(line)
        if e.get("type") != "train":
            continue
        l = e["losses"]
        rows[e["iteration"]] = {
            "dino": l["dino_local_crops_loss"] + l["dino_global_crops_loss"],
            "ibot_loss": l.get("ibot_loss", float("nan")),
            "koleo_loss": l.get("koleo_loss", float("nan")),
            "teacher_temp": e["teacher_temp"],
        }
    return rows


def reference(path):
    rows = {}
    for r in csv.DictReader(open(path)):
        rows[int(r["iteration"])] = {
            "dino": float(r["dino_total"]),
            "ibot_loss": float(r["ibot_loss"]),
            "koleo_loss": float(r["koleo_loss"]),
            "teacher_temp": float(r["teacher_temp"]),
            "target_entropy": float(r["teacher_target_entropy"]),
        }
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("reference")
    ap.add_argument("out")
    ap.add_argument("--prototypes", type=int, default=256)
    a = ap.parse_args()
    o, r = ours(a.ours), reference(a.reference)
    its = sorted(set(o) & set(r))
    if not its:
        raise SystemExit("no common iterations")
    # Dinoflow's metrics.jsonl numbers iterations from 1 (after the step), the reference
    # from 0 (before it): align on the step count.
    if min(o) == 1 and min(r) == 0:
        o = {k - 1: v for k, v in o.items()}
        its = sorted(set(o) & set(r))
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "teacher_temp"]
                   + [f"{s}_{n}" for n in LOSSES for s in ("dinoflow", "reference")]
                   + ["reference_target_entropy"])
        for i in its:
            w.writerow([i, r[i]["teacher_temp"]]
                       + [f"{x[i][n]:.6f}" for n in LOSSES for x in (o, r)]
                       + [f"{r[i]['target_entropy']:.6f}"])
    lnk = math.log(a.prototypes)
    print(f"ln(K = {a.prototypes}) = {lnk:.4f} (the DINO loss of uniform targets and predictions)")
    print(f"{'iteration':>9} | {'DINO ours':>9} {'DINO ref':>9} | {'iBOT ours':>9} {'iBOT ref':>9}"
          f" | {'KoLeo ours':>10} {'KoLeo ref':>10} | ref target entropy")
    shown = [i for i in its if i % 25 == 0 or i == its[-1]]
    for i in shown:
        print(f"{i:>9} | {o[i]['dino']:9.4f} {r[i]['dino']:9.4f} | {o[i]['ibot_loss']:9.4f}"
              f" {r[i]['ibot_loss']:9.4f} | {o[i]['koleo_loss']:10.4f} {r[i]['koleo_loss']:10.4f}"
              f" | {r[i]['target_entropy']:.4f}")
    tail = its[-50:]
    for name in LOSSES:
        mo = sum(o[i][name] for i in tail) / len(tail)
        mr = sum(r[i][name] for i in tail) / len(tail)
        print(f"mean of the last {len(tail)} iterations, {name}: ours {mo:.4f}, reference {mr:.4f}")


if __name__ == "__main__":
    main()
