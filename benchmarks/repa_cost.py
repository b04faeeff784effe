"""What --repa costs per training step: the table's repa_base and repa rows, interleaved in one process.

    python benchmarks/repa_cost.py                    # CUDA: DiT-XL/2, batch 128; CPU: the tiny model, batch 8
    python benchmarks/repa_cost.py --rounds 8 --steps 10 --out benchmarks/results

Both rows are built once through train.py's step (benchmarks/table.py's row_config + train_step's
build_state), then timed in alternation: ``rounds`` x (``steps`` steps of repa_base, ``steps`` of repa,
``steps`` encoder forwards), synchronised. Medians over rounds make the ratio robust to a machine whose
load changes during the run (a shared CPU); single table rows are not. Prints and writes JSON: steps/s
of both, their ratio, the encoder's forward time and share of the --repa step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "kernels", HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

import report  # noqa: E402
import table  # noqa: E402
from train_step import build_state, free_state  # noqa: E402


def timed_rounds(states: dict, rounds: int, steps: int, device: torch.device) -> dict:
    """Seconds per step of each state's step_fn (and of the REPA row's encoder), per round."""
    def per_step(fn) -> float:
        table_sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        table_sync(device)
        return (time.perf_counter() - start) / steps
    times = {key: [] for key in (*states, "encoder")}
    for _ in range(rounds):
        for key, state in states.items():
            times[key].append(per_step(state.step_fn))
        times["encoder"].append(per_step(states["repa"].encoder_call))
    return times


def table_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps per row per round")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for repa-cost-<device>-<date>.json (default: print only)")
    own = p.parse_args(argv)
    args = table.resolve_defaults(table.parse_args(
        ["--rows", "repa_base,repa", *(["--device", own.device] if own.device else []),
         *(["--batch", str(own.batch)] if own.batch else [])]))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {r.key: r for r in table.select_rows("repa_base,repa")}
    states = {}
    for key, row in rows.items():
        cfg = table.row_config(row, args)
        states[key] = build_state(cfg, None, (4, cfg.model.input_size, cfg.model.input_size),
                                  args.num_classes, args.seed)
        for _ in range(args.warmup + 1):
            states[key].step_fn()
    times = timed_rounds(states, own.rounds, own.steps, args.device)
    med = {key: statistics.median(v) for key, v in times.items()}
    result = {"device": report.device_name(args.device), "model": args.model, "batch": args.batch,
              "rounds": own.rounds, "steps_per_round": own.steps,
              "steps_per_s": {k: 1 / med[k] for k in rows}, "ratio_repa_over_base": med["repa_base"] / med["repa"],
              "encoder_ms": 1e3 * med["encoder"], "encoder_share_of_repa_step": med["encoder"] / med["repa"],
              "per_round_ratio": [b / r for b, r in zip(times["repa_base"], times["repa"])],
              "commands": {k: table.train_command(row, args) for k, row in rows.items()},
              "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    for state in states.values():
        free_state(state)
    print(json.dumps(result, indent=2))
    if own.out:
        path = Path(own.out) / f"repa-cost-{report.device_slug(args.device)}-{time.strftime('%Y-%m-%d')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
