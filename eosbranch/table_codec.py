"""A tidy table as bytes and back, with the checks that make damage detected rather than read.

A Parquet file is readable only through its footer, at its end, so a truncated table loses every
row, and a byte flipped inside it can decode to wrong numbers. Each table therefore carries Parquet
page checksums and the sha256 of its rows (key-value metadata ``eosbranch.rows_sha256``); the row
segments (row_segments.py) are encoded the same way.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import tables

ROWS_KEY = b"eosbranch.rows_sha256"


class Damaged(Exception):
    """A table or segment that cannot be trusted; ``str`` says why (one line)."""


def rows_digest(name: str, df: pd.DataFrame) -> str:
    """sha256 of a table's rows (values, not bytes on disk), as stored in its Parquet metadata."""
    h = hashlib.sha256()
    for c in tables.COLUMNS[name]:
        col = df[c]
        values = col.to_numpy() if pd.api.types.is_numeric_dtype(col) else col.to_numpy(dtype=object)
        h.update(c.encode() + b"\0" + pd.util.hash_array(values).tobytes())
    return h.hexdigest()


def encode_table(name: str, df: pd.DataFrame) -> bytes:
    t = tables.to_arrow(name, df)
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), ROWS_KEY: rows_digest(name, df).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def decode_table(name: str, source) -> pd.DataFrame:
    """Read a table written by :func:`encode_table`, checking page checksums, columns and rows."""
    try:
        t = pq.read_table(source, page_checksum_verification=True)
        df = t.to_pandas()
    except Exception as err:  # truncated, garbled: pyarrow raises many types; all mean "damaged"
        why = (str(err).splitlines() or [""])[0][:160]
        raise Damaged(f"unreadable Parquet ({type(err).__name__}: {why})") from None
    if list(df.columns) != tables.COLUMNS[name]:
        raise Damaged(f"unexpected columns {list(df.columns)}")
    want = (t.schema.metadata or {}).get(ROWS_KEY)
    if want is not None and want.decode(errors="replace") != rows_digest(name, df):
        raise Damaged("its rows do not match their sha256 (garbled)")
    return df


def empty_table(name: str) -> pd.DataFrame:
    """A table with no rows, as pandas reads an empty one back (string columns keep their dtype)."""
    return decode_table(name, pa.BufferReader(encode_table(name, tables.empty(name))))


def frame_bytes(df: pd.DataFrame) -> bytes:
    """An analysis table (e.g. opposing pairs) whose columns are its producer's contract."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()
