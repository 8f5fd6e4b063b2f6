"""Benchmark: toy-model training throughput here, and time to 95% task accuracy.

    python benchmarks/bench_toy_train.py                       # CPU, batch 64 and 256
    python benchmarks/bench_toy_train.py --device cuda --batch-sizes 256 1024
    python benchmarks/bench_toy_train.py --allocator            # glibc defaults, then freed memory kept

Throughput times whole optimizer steps as `toy_models.train` runs them (batch drawn,
memento-masked forward, loss on the memento digits, backward, clip, AdamW) after two
warm-up steps; tokens/s counts every token of the 122-token sequences. Time to 95% is
read from the shipped run's training log (toy_models/checkpoints/training_log.jsonl)
and, for this machine, estimated as steps-to-95% x the measured step time at the
shipped batch size.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from toy_models.checkpoint import CHECKPOINT_DIR, read_meta
from toy_models.data import SEQ_LEN, generate
from toy_models.model import build_model
from toy_models.task import memento_attention, task_loss
from toy_models.train import TrainConfig, make_optimizer, training_batch


def step_time(batch_size: int, steps: int, device: str) -> float:
    """Mean seconds per training step at `batch_size` on `device`."""
    config = TrainConfig(batch_size=batch_size, device=device)
    model = build_model(0).to(device).train()
    optimizer = make_optimizer(model, config)
    attention = memento_attention(model)

    def one(step: int) -> None:
        ids = training_batch(config, step).to(device)  # (B, T)
        loss = task_loss(model, ids, attention)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    for step in range(2):
        one(step)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(steps):
        one(2 + step)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--allocator", action="store_true",
                        help="time each batch size with glibc's defaults, then with freed memory kept as the CLI "
                             "keeps it (kvprobe.cli.runtime), in this process; print the ratio")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"

    t0 = time.perf_counter()
    generate(50_000, 0)
    gen_s = time.perf_counter() - t0

    print(f"toy training throughput on {where} (torch {torch.__version__})")
    per_step: dict[int, float] = {}
    if args.allocator:
        from kvprobe.cli.runtime import keep_freed_memory

        before = {b: step_time(b, args.steps, args.device) for b in args.batch_sizes}
        keep_freed_memory()
        print(f"{'batch':>6} {'ms/step, glibc defaults':>24} {'ms/step, freed memory kept':>27} {'ratio':>6}")
        for b in args.batch_sizes:
            per_step[b] = step_time(b, args.steps, args.device)
            print(f"{b:>6} {before[b] * 1e3:>24.1f} {per_step[b] * 1e3:>27.1f} {before[b] / per_step[b]:>6.2f}")
    else:
        print(f"{'batch':>6} {'ms/step':>9} {'tokens/s':>10} {'seq/s':>8}")
        for batch_size in args.batch_sizes:
            dt = per_step[batch_size] = step_time(batch_size, args.steps, args.device)
            print(f"{batch_size:>6} {dt * 1e3:>9.1f} {batch_size * SEQ_LEN / dt:>10,.0f} {batch_size / dt:>8,.0f}")
    print(f"\ndata: generate(50,000) takes {gen_s:.3f} s")

    log_path = CHECKPOINT_DIR / "training_log.jsonl"
    if not log_path.is_file():
        print("no shipped training log: time to 95% not available")
        return
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    meta = read_meta("final")
    shipped_batch = meta["config"]["batch_size"]
    print(f"\nshipped run: {meta['command']}\n  on {meta['hardware']}")
    print(f"{'accuracy':>9} {'step':>6} {'wall s (shipped)':>17} {'est. s here':>12}")
    here = per_step.get(shipped_batch)
    for target in (0.75, 0.90, 0.95, 0.99):
        hit = next((r for r in log if r["task_accuracy"] >= target), None)
        if hit is None:
            print(f"{target:>9.0%} {'never':>6}")
            continue
        est = f"{hit['step'] * here:>12,.0f}" if here else f"{'(batch ' + str(shipped_batch) + ')':>12}"
        print(f"{target:>9.0%} {hit['step']:>6} {hit['wall_time_s']:>17.1f} {est}")
    print(f"final: step {meta['step']}, task accuracy {meta['task_accuracy']:.4f}, {meta['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
