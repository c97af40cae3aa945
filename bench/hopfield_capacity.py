"""Capacity of the Hopfield reservoir: recall rate against the number of stored random patterns.

For each width d, random +-1 patterns are stored one by one with the reservoir's Storkey-style
rule; at each count, every stored pattern is corrupted (a fraction `flip` of its bits flipped)
and settled with the sign dynamics, and the share restored exactly is the recall rate. Prints a
table and one JSON line (the last line of stdout).

    .venv/bin/python bench/hopfield_capacity.py --quick     # d = 256, 512: seconds
    .venv/bin/python bench/hopfield_capacity.py             # d = 256 .. 2048: minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from supsup.hopfield import capacity_curve

FRACTIONS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)  # stored patterns / d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only d = 256 and 512")
    parser.add_argument("--d", type=int, nargs="*", help="widths (default 256 512 1024 2048)")
    parser.add_argument("--flip", type=float, default=0.1, help="fraction of bits flipped")
    parser.add_argument("--max-iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    widths = args.d or ([256, 512] if args.quick else [256, 512, 1024, 2048])

    start = time.perf_counter()
    curves: dict[int, list[tuple[int, float]]] = {}
    for d in widths:
        counts = sorted({max(1, round(f * d)) for f in FRACTIONS})
        curves[d] = capacity_curve(d, counts, flip=args.flip, max_iters=args.max_iters,
                                   seed=args.seed, device=args.device)
    seconds = time.perf_counter() - start

    print(f"recall rate from {args.flip:.0%} flipped bits (rows: stored patterns / d)")
    print(f"{'P/d':>6} " + " ".join(f"{'d=' + str(d):>10}" for d in widths))
    for i, f in enumerate(FRACTIONS):
        cells = []
        for d in widths:
            count, rate = curves[d][i] if i < len(curves[d]) else (0, float("nan"))
            cells.append(f"{rate:>5.2f} ({count:>3})")
        print(f"{f:>6.2f} " + " ".join(f"{c:>10}" for c in cells))
    capacity = {d: max([c for c, r in curves[d] if r >= 0.9], default=0) for d in widths}
    print("largest count recalled at >= 90%: "
          + ", ".join(f"d={d}: {c} ({c / d:.2f} d)" for d, c in capacity.items()))
    print(json.dumps({
        "bench": "hopfield_capacity", "flip": args.flip, "max_iters": args.max_iters,
        "seed": args.seed, "device": str(args.device),
        "curves": {str(d): [[c, r] for c, r in curve] for d, curve in curves.items()},
        "capacity_at_90": {str(d): c for d, c in capacity.items()},
        "seconds": round(seconds, 2),
    }))


if __name__ == "__main__":
    main()
