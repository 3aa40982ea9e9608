"""Per-example tables as files: CSV (text) or Parquet, for the API's export route and ``ivon-diag export``."""

from __future__ import annotations

import csv
import io

FORMATS = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


def table_bytes(cols: dict[str, list], fmt: str) -> bytes:
    """``cols`` (name → column) as a CSV with a header row, or a Parquet file."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows(zip(*cols.values()))
        return buf.getvalue().encode()
    if fmt != "parquet":
        raise ValueError(f"Invalid export format: {fmt!r} (must be one of {', '.join(FORMATS)})")
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table(cols), sink)
    return sink.getvalue()
