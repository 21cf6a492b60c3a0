"""Tune's storage as the cluster sees it: a remote URI must answer before any Ray work starts."""

from __future__ import annotations

import threading

from orchestrator.schema import SweepError

PROBE_TIMEOUT_S = 30.0  # a healthy object store answers a listing in well under a second


def check_remote_storage(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Open ``uri`` with pyarrow (as Tune will) and look up its bucket or top folder; an unreachable
    endpoint, refused credentials or a missing bucket raise one ``SweepError`` line. Local folders
    are checked when the spec is parsed, so they pass here. S3 endpoints other than AWS come from
    the standard ``AWS_ENDPOINT_URL`` variable (with ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``)."""
    if "://" not in uri or uri.startswith("file://"):
        return
    outcome: dict[str, object] = {}

    def probe() -> None:
        try:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(uri)
            top = path.strip("/").split("/")[0]
            outcome["found"] = fs.get_file_info(top).type != pafs.FileType.NotFound
        except Exception as exc:  # pyarrow raises OSError, ArrowInvalid... with the SDK's message
            outcome["error"] = " ".join(str(exc).split())[:300]

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    where = f"sweep.storage_path: {uri}"
    if thread.is_alive():
        raise SweepError(
            f"{where}: no answer within {timeout_s:g} s (is the endpoint reachable? AWS_ENDPOINT_URL "
            f"sets a non-AWS S3 endpoint)"
        )
    if "error" in outcome:
        raise SweepError(f"{where}: cannot be opened ({outcome['error']})")
    if not outcome.get("found"):
        raise SweepError(f"{where}: its bucket or top folder does not exist; create it first")
