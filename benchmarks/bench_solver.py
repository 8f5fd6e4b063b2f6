"""The linear probe's solver on a real store: preconditioned L-BFGS vs plain L-BFGS vs converged references.

Every cell of a store (the toy's default features: per-token K,V over the memento span,
D = 1,280) is fitted on the probe stage's split, at the L2 strength the probe stage chooses
for it (`select_strength` on the inner split, as `probe_store` does), in one process:

    ours       preconditioned L-BFGS at the probe stage's tolerance (max |gradient| <= 1e-3)
    plain      plain L-BFGS (scipy's algorithm; kvprobe's solver before) at the same tolerance
    reference  L-BFGS run to max |gradient| <= 1e-5 (preconditioned: the same optimum, reached sooner)
    plain-ref  plain L-BFGS to 1e-5 on the first --plain-reference-cells cells (the reference's own check)
    sklearn    scikit-learn's LogisticRegression (lbfgs, tol 1e-6), one probe at a time, first --sklearn-cells

It reports wall time per solver and, per cell, the validation accuracy difference to the
reference (percentage points). The target: every cell within 0.5 pp.

    python benchmarks/bench_solver.py --store kvprobe-demo/stores/memento
    python benchmarks/bench_solver.py --store runs/toy_reproduction/stores/memento --plain-cells 2 --out solver.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch

from kvprobe.analysis import ProbeConfig, _groups, _plan, _splits
from kvprobe.probes import FeatureMoments, fit_probes, fit_sklearn, select_strength
from kvprobe.store import KVStore


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--tol", type=float, default=ProbeConfig().linear.tol)
    ap.add_argument("--reference-tol", type=float, default=1e-5)
    ap.add_argument("--plain-cells", type=int, default=None,
                    help="fit plain L-BFGS at the probe tolerance on only the first N cells (default: all)")
    ap.add_argument("--plain-reference-cells", type=int, default=4)
    ap.add_argument("--sklearn-cells", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-group-bytes", type=int, default=ProbeConfig().max_group_bytes)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = ProbeConfig(families=("linear",), max_group_bytes=args.max_group_bytes)
    ours = replace(settings.linear, tol=args.tol)
    solvers = {
        "ours": ours,
        "plain": replace(ours, precondition=False),
        "reference": replace(ours, tol=args.reference_tol, max_iter=20000),
        "plain-ref": replace(ours, tol=args.reference_tol, max_iter=20000, precondition=False),
    }
    names = [*solvers, "sklearn"]
    times = dict.fromkeys([*names, "selection"], 0.0)
    acc: dict[str, list[float]] = {n: [] for n in names}
    iters: dict[str, list[int]] = {n: [] for n in solvers}
    chosen: list[float] = []
    with KVStore(args.store) as store:
        cells, D = _plan(store, settings)
        tr, va, inner = _splits(store, settings, need_inner=True)
        y_tr, y_va = store.labels[tr], store.labels[va]
        print(f"{args.store}: {len(cells)} cells, D = {D}, {len(tr)} train / {len(va)} validation samples, "
              f"{args.threads} threads, load {os.getloadavg()[0]:.2f}", flush=True)
        for group in _groups(cells, len(store.labels), D, args.max_group_bytes):
            X = np.stack([store.features(c.layer, c.offset, c.site, c.pooling) for c in group])
            X = torch.from_numpy(X.reshape(len(group), len(store.labels), D)).float()
            xt, xv = X[:, tr], X[:, va]
            moments = FeatureMoments.of(xt)
            sel, dt = _timed(lambda: select_strength(xt, y_tr, settings.strength_grid("linear"), inner_val=inner,
                                                     config=ours, moments=moments))
            times["selection"] += dt
            chosen += sel.chosen.tolist()
            for name, config in solvers.items():
                start = len(acc[name])
                limit = {"plain": args.plain_cells, "plain-ref": args.plain_reference_cells}.get(name)
                if limit is not None:
                    n = max(0, min(len(group), limit - start))
                else:
                    n = len(group)
                if n == 0:
                    continue
                fit, dt = _timed(lambda: fit_probes(xt[:n], y_tr, xv[:n], y_va, l2=sel.chosen[:n], config=config))
                times[name] += dt
                iters[name] += fit.n_steps.max(axis=1).tolist()
                acc[name] += fit.accuracy.tolist()
                if not fit.converged.all():
                    print(f"  warning: {name} did not converge in {int((~fit.converged).sum())} problems")
            for g in range(len(group)):
                if len(acc["sklearn"]) >= args.sklearn_cells:
                    break
                fit, dt = _timed(lambda: fit_sklearn(xt[g:g + 1], y_tr, xv[g:g + 1], y_va, l2=float(sel.chosen[g]),
                                                     tol=1e-6, max_iter=5000))
                times["sklearn"] += dt
                acc["sklearn"] += fit.accuracy.tolist()
            print(f"  {len(acc['ours'])}/{len(cells)} cells", flush=True)
    ref = np.asarray(acc["reference"])
    diff = {n: (np.asarray(a) - ref[:len(a)]) * 100 for n, a in acc.items()}
    print(f"\n{len(cells)} cells at their chosen L2 ({', '.join(f'{v:g}: {chosen.count(v)}' for v in sorted(set(chosen)))})")
    print("| solver | cells | seconds | max iterations | largest abs(accuracy - reference) |\n|---|---|---|---|---|")
    for n in names:
        worst = f"{np.abs(diff[n]).max():.2f} pp" if len(diff[n]) else "-"
        its = max(iters[n]) if iters.get(n) else "-"
        print(f"| {n} | {len(acc[n])} | {times[n]:.1f} | {its} | {worst} |")
    print(f"selection (4-value path on the inner split, ours): {times['selection']:.1f} s")
    if len(acc["plain"]) == len(acc["ours"]):
        print(f"ours is {times['plain'] / times['ours']:.1f}x faster than plain L-BFGS at the same tolerance")
    print(f"ours is {times['reference'] / times['ours']:.1f}x faster than the converged reference")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"store": args.store, "threads": args.threads, "cells": [str(c) for c in cells], "chosen": chosen,
                       "seconds": times, "accuracy": acc, "max_iterations": iters,
                       "max_abs_diff_pp": {n: float(np.abs(d).max()) if len(d) else None for n, d in diff.items()},
                       "load_after": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
