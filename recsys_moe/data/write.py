"""Writing Parquet: every file the project writes goes through here, so that it carries page
checksums (CRC32 of every data and dictionary page, in the page headers).

The reader verifies them (`files.open_parquet`), so a corrupted page fails loudly, as a bad row
group of reason `checksum_mismatch`, instead of decoding to different values: without checksums
most byte flips inside a data page decode without any error (see README, "Your own data").
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

# The options of every Parquet file the project writes.
WRITE_OPTIONS = {"write_page_checksum": True}


def write_table(table: pa.Table, path: str | Path, row_group_size: Optional[int] = None) -> None:
    """pq.write_table with the project's options (page checksums)."""
    pq.write_table(table, path, row_group_size=row_group_size, **WRITE_OPTIONS)


def parquet_writer(path: str | Path, schema: pa.Schema) -> pq.ParquetWriter:
    """pq.ParquetWriter with the project's options (page checksums), for writing in pieces."""
    return pq.ParquetWriter(path, schema, **WRITE_OPTIONS)
