"""Claim 5's latency side: a CCT with its first blocks conv-replaced vs the same CCT with attention.

    python benchmarks/conv_latency.py [--model SPEC_JSON] [--conv-blocks 0,1] [--large-batch 256]

Latency depends on the architecture, not on trained weights, so every variant is built from random
init in this one process and timed with the same ``measure_latency`` the trials log (fp32, batch 1
and ``--large-batch``, medians), in contiguous and channels_last memory formats, the variants
interleaved over ``--rounds`` rounds so that drift in the machine's load hits all alike. The plain
model (0 conv blocks) is the baseline. Each round pairs every variant with the baseline, so the
ratio to the baseline also comes per round, with its mean, sample sd and 95 % t interval over the
rounds (``*_ratio_over_rounds``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch

from analysis.stats import mean_spread
from trainables.models import build_model, count_macs, count_params, resolve_spec
from trainables.train import measure_latency


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default='{"preset": "cct_narrow", "tokenizer_layers": 2, "heads": 4, "head_dim": 32}',
        help="model spec (JSON) shared by every variant",
    )
    parser.add_argument("--conv-blocks", default="0,1", help="n_conv_blocks of each variant; the first is the baseline")
    parser.add_argument("--large-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per batch-1 measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    base = json.loads(args.model)
    counts = [int(n) for n in args.conv_blocks.split(",")]
    models = {}
    for n in counts:
        torch.manual_seed(0)
        models[n] = build_model({**base, "n_conv_blocks": n}).eval()
    image_size = resolve_spec(base)["image_size"]
    samples: dict[tuple[int, str], list[dict]] = {
        (n, fmt): [] for n in counts for fmt in ("contiguous", "channels_last")
    }
    for _ in range(args.rounds):
        for n, model in models.items():
            for fmt in ("contiguous", "channels_last"):
                model.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
                samples[(n, fmt)].append(
                    measure_latency(model, image_size, torch.device("cpu"), args.large_batch, args.repeats)
                )
    rows = []
    for (n, fmt), runs in samples.items():
        rows.append(
            {
                "n_conv_blocks": n,
                "memory_format": fmt,
                "params": count_params(models[n]),
                "macs": count_macs(models[n]),
                "latency_ms_b1": round(float(np.median([r["latency_ms_b1"] for r in runs])), 3),
                "latency_ms_per_image_large_batch": round(
                    float(np.median([r["latency_ms_per_image_large_batch"] for r in runs])), 4
                ),
            }
        )
    baseline = {r["memory_format"]: r for r in rows if r["n_conv_blocks"] == counts[0]}
    for row in rows:
        ref = baseline[row["memory_format"]]
        row["b1_vs_baseline"] = round(row["latency_ms_b1"] / ref["latency_ms_b1"], 3)
        row["large_batch_vs_baseline"] = round(
            row["latency_ms_per_image_large_batch"] / ref["latency_ms_per_image_large_batch"], 3
        )
        runs, base_runs = (
            samples[(row["n_conv_blocks"], row["memory_format"])],
            samples[(counts[0], row["memory_format"])],
        )
        for key, name in (("latency_ms_b1", "b1"), ("latency_ms_per_image_large_batch", "large_batch")):
            spread = mean_spread([r[key] / b[key] for r, b in zip(runs, base_runs)])
            row[f"{name}_ratio_over_rounds"] = {
                "n": spread.n,
                "mean": round(spread.mean, 3),
                "sd": None if spread.sd is None else round(spread.sd, 3),
                "ci95": None if spread.low is None else [round(spread.low, 3), round(spread.high, 3)],
            }
    print(
        json.dumps(
            {
                "model": base,
                "large_batch": args.large_batch,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "rows": rows,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
