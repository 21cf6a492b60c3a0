"""``python -m orchestrator committee predict MODEL_URI IMAGES [--out FILE]``: label images with a
registered committee (or any model this project logged).

IMAGES is a folder of PNG/JPEG files or a Parquet file of encoded images (an ``img`` or ``image``
column as in the Hugging Face layout, ``{bytes, path}``). Every image must have the size the
model's signature names; they go through the model in batches on the GPU when one is visible
(``--device``), with progress on stderr, and the
output Parquet holds ``source`` (file name or row), ``label`` and ``probs`` (list<float32>).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from orchestrator.schema import CommitteeError
from trainables.device import pick_device

SUFFIXES = (".png", ".jpg", ".jpeg")


AUTHOR_ADVICE = "Add type hints to the `predict` method"  # MLflow's UserWarning when a served model's code loads


@contextlib.contextmanager
def quiet_model_warnings() -> Iterator[None]:
    """Hide MLflow's advice to the model's author (type hints on ``predict``), so that a user's one
    error line stands alone. A warnings filter cannot do it: MLflow sets its own ("once") around the
    warning, so the advice is dropped where warnings are shown."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_others(message, category, filename, lineno, file=None, line=None):
            if not (issubclass(category, UserWarning) and AUTHOR_ADVICE in str(message)):
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_others
        yield


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", exc)).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def read_images(path: Path) -> tuple[list[str], list[bytes]]:
    """(names, encoded images) of a folder of PNG/JPEG files or a Parquet file of images."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise CommitteeError(f"{path}: no .png, .jpg or .jpeg files")
        return [p.name for p in files], [p.read_bytes() for p in files]
    if path.suffix == ".parquet" and path.is_file():
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise CommitteeError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
        column = next((c for c in ("img", "image") if c in table.column_names), None)
        if column is None:
            raise CommitteeError(f"{path}: no 'img' or 'image' column (has {', '.join(table.column_names) or 'none'})")
        if table.num_rows == 0:
            raise CommitteeError(f"{path}: no images (0 rows)")
        cells = table.column(column).to_pylist()
        return [str(i) for i in range(len(cells))], [c["bytes"] if isinstance(c, dict) else c for c in cells]
    raise CommitteeError(f"{path}: not a folder of images or a .parquet file")


def decode(names: list[str], blobs: list[bytes], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3); one line naming the first image that cannot be read or has another size."""
    out = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, (name, blob) in enumerate(zip(names, blobs)):
        try:
            image = Image.open(io.BytesIO(blob)).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
            raise CommitteeError(f"image {name}: cannot be decoded ({type(exc).__name__})") from None
        if image.size != (size, size):
            raise CommitteeError(f"image {name} is {image.size[0]}x{image.size[1]} px, the model takes {size}x{size}")
        out[i] = np.asarray(image)
    return out


def predict_images(
    model_uri: str, images: Path, out: Path, device: str = "auto", batch: int = 512, tracking_uri: str | None = None
) -> Path:
    """Label every image with the model on ``device`` (auto: the GPU when one is visible); writes the
    output Parquet and returns its path. ``tracking_uri``: the store a ``models:/`` or ``runs:/`` URI is
    read from (MLflow's fluent API is pointed there; default: where it points already)."""
    device = pick_device(device, "--device").type
    names, blobs = read_images(images)  # the input is checked before the model loads
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)  # MLFLOW_TRACKING_URI alone loses to an earlier set_tracking_uri
    with tempfile.TemporaryDirectory(prefix="unitlab-predict-") as tmp:
        try:  # downloaded into tmp: MLflow writes a registered model's meta file where it loads it from
            with quiet_model_warnings():
                model = mlflow.pyfunc.load_model(model_uri, dst_path=tmp)
        except Exception as exc:  # noqa: BLE001 - an unknown or unreadable model is bad input
            raise CommitteeError(f"{model_uri}: cannot be loaded ({_first_line(exc)})") from None
        spec = model.metadata.get_input_schema()
        size = spec.inputs[0].shape[1] if spec is not None else 32
        pixels = decode(names, blobs, size)
        probs, labels = [], []
        for start in range(0, len(pixels), batch):
            with quiet_model_warnings():
                result = model.predict(pixels[start : start + batch], params={"device": device})
            chunk = result["probs"] if isinstance(result, dict) else np.asarray(result)
            probs.append(np.asarray(chunk, dtype=np.float32))
            labels.append(np.asarray(result["label"]) if isinstance(result, dict) else probs[-1].argmax(axis=1))
            print(
                f"\rpredict: {min(start + batch, len(pixels))}/{len(pixels)} images",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print(file=sys.stderr)
    all_probs = np.concatenate(probs)
    table = pa.table(
        {
            "source": names,
            "label": np.concatenate(labels).astype(np.int64),
            "probs": pa.array(list(all_probs), type=pa.list_(pa.float32())),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")  # a whole file or none
    try:
        pq.write_table(table, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out
