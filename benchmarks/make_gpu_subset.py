"""A CIFAR-100 subset small enough to travel with the repository to a bare GPU box.

    python benchmarks/make_gpu_subset.py [--data-dir ../shared/data] [--train 20000] [--test 2000] [--out benchmarks/data]

Writes OUT/cifar100/ in the same Parquet layout as the shared data (the first N training and test
rows, which the shared copy keeps in a shuffled, roughly class-balanced order; labels.json), so
``DataConfig(data_dir=OUT)`` reads it unchanged. OUT is git-ignored: the images never enter the
repository, only the working tree that the device tool copies (at most 64 MiB: PNGs take about
2.2 KB each, so the defaults make about 48 MiB). Rows keep their PNG bytes; nothing is re-encoded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "../shared/data"))
    parser.add_argument("--train", type=int, default=20000, help="training rows to keep (of 50,000)")
    parser.add_argument("--test", type=int, default=2000, help="test rows to keep (of 10,000)")
    parser.add_argument("--out", default="benchmarks/data")
    args = parser.parse_args()
    source = Path(args.data_dir) / "cifar100"
    shards = sorted(source.glob("train-*.parquet"))
    if not shards or not (source / "test-00000-of-00001.parquet").is_file():
        print(f"error: --data-dir {args.data_dir}: no cifar100/ Parquet shards there", file=sys.stderr)
        return 2
    for flag, value, most in (("--train", args.train, 50000), ("--test", args.test, 10000)):
        if not 0 < value <= most:
            print(f"error: {flag} must be in 1..{most}, got {value}", file=sys.stderr)
            return 2
    tables, rows = [], 0
    for shard in shards:
        if rows >= args.train:
            break
        table = pq.read_table(shard).slice(0, args.train - rows)
        tables.append(table)
        rows += table.num_rows
    test = pq.read_table(source / "test-00000-of-00001.parquet").slice(0, args.test)
    target = Path(args.out) / "cifar100"
    staging = target.with_name("cifar100.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    pq.write_table(pa.concat_tables(tables), staging / "train-00000-of-00001.parquet")
    pq.write_table(test, staging / "test-00000-of-00001.parquet")
    shutil.copyfile(source / "labels.json", staging / "labels.json")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    size = sum(p.stat().st_size for p in target.iterdir()) / 2**20
    print(f"{target}: {rows} training rows, {test.num_rows} test rows, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
