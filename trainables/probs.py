"""Per-example softmax probabilities as Parquet: the artifact committees are built from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_probs(
    path: Path, probs: np.ndarray, labels: np.ndarray, indices: np.ndarray, dataset: str, split: str
) -> None:
    """Write columns index, label, probs (list<float32>) with dataset/split/num_classes metadata."""
    n, num_classes = probs.shape
    flat = pa.array(np.ascontiguousarray(probs, dtype=np.float32).reshape(-1))
    table = pa.table(
        {
            "index": pa.array(np.asarray(indices, dtype=np.int64)),
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
            "probs": pa.FixedSizeListArray.from_arrays(flat, num_classes),
        }
    )
    meta = {"dataset": dataset, "split": split, "num_classes": str(num_classes)}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    pq.write_table(table, path, use_dictionary=["index", "label"])


def read_probs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """(index, label, probs (N, C) float32, metadata) from a file written by ``write_probs``."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if not k.startswith(b"ARROW")}
    column = table.column("probs").combine_chunks()
    width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else len(column[0])
    probs = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    return table.column("index").to_numpy(), table.column("label").to_numpy(), probs, meta
