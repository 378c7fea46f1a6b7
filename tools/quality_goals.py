"""Check the quality goals of the OBSPA issue against a bench_quality results.json (prints markdown).

    python tools/quality_goals.py .bench/quality/results.json

Goals, per model, without fine-tuning, accuracy means over seeds:
1. obspa (128 calibration samples) within 1 point of unpruned at 50% MACs removed (keep 0.5);
2. ... within 3 points at 70% removed (keep 0.3);
3. obspa beats the best Torch-Pruning criterion with BN re-estimation ('+bn') at the same target;
4. obspa not worse than the simple refit (l1 + sequential least squares, 'l1-refit');
5. obspa data-free beats TP magnitude without re-estimation by >= 20 points at 30% removed (keep 0.7).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def main(path: str) -> int:
    rows = json.load(open(path))["rows"]
    acc = defaultdict(list)
    for r in rows:
        if r.get("accuracy") is not None and not r.get("error"):
            acc[(r["model"], r["method"], float(r["target"]))].append(100 * r["accuracy"])
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    models = sorted({k[0] for k in acc})
    print("| model | goal | ours | reference | margin | met |\n|---|---|---:|---:|---:|:---:|")

    def line(model, goal, ours, ref, margin, ok):
        f = (lambda x: "n/a" if x is None else f"{x:.2f}")
        print(f"| {model} | {goal} | {f(ours)} | {f(ref)} | {f(margin)} | {'yes' if ok else 'NO'} |")

    for m in models:
        base = mean.get((m, "unpruned", 1.0))
        for target, limit in ((0.5, 1.0), (0.3, 3.0)):
            o = mean.get((m, "obspa", target))
            if o is not None and base is not None:
                line(m, f"obspa within {limit:g} pt of unpruned at keep {target}", o, base, o - base,
                     base - o <= limit)
        for target in (0.7, 0.5, 0.3):
            o = mean.get((m, "obspa", target))
            tp = {k[1]: v for k, v in mean.items() if k[0] == m and k[2] == target and k[1].startswith("tp-")
                  and k[1].endswith("+bn")}
            if o is not None and tp:
                best = max(tp, key=tp.get)
                line(m, f"obspa > best TP+bn ({best}) at keep {target}", o, tp[best], o - tp[best], o > tp[best])
            ref = mean.get((m, "l1-refit", target))
            if o is not None and ref is not None:
                line(m, f"obspa >= l1 refit at keep {target}", o, ref, o - ref, o >= ref - 1e-9)
        o = mean.get((m, "obspa-datafree", 0.7))
        tp = [v for k, v in mean.items() if k[0] == m and k[2] == 0.7 and k[1] in ("tp-magnitude-global",
                                                                                  "tp-magnitude-local")]
        if o is not None and tp:
            best = max(tp)
            line(m, "obspa data-free >= TP magnitude (no BN re-est., best scope) + 20 at keep 0.7", o, best,
                 o - best, o - best >= 20)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".bench/quality/results.json"))
