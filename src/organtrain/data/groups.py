"""Patient/slide/specimen groups from a table, for trees whose layout cannot change.

`prepare.groups_table` names a CSV or Parquet file (a local path or s3:// URI) with one row
per image: a `key` column (the image's path relative to the source root, as in the
manifest) and a `group` column; any other columns are kept, per image, as metadata in the
manifest. A table's group overrides the group folder of the layout, so one table can
regroup a whole tree.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from organtrain.data.scan import Candidate
from organtrain.errors import DataError, ObjectNotFoundError
from organtrain.storage import open_storage

REQUIRED_COLUMNS = ("key", "group")


@dataclass(frozen=True)
class GroupTable:
    uri: str
    groups: dict[str, str]  # image key -> group
    metadata: dict[str, str]  # image key -> the row's other columns, as a JSON object


def load_group_table(uri: str) -> GroupTable:
    """Read and check the table at `uri`; every error names the file and what to fix."""
    table = _read_table(uri)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"{uri}: the groups table needs the columns {', '.join(REQUIRED_COLUMNS)}; "
            f"missing {', '.join(missing)} (it has: {', '.join(table.column_names) or 'none'})"
        )
    rows = table.to_pylist()
    groups: dict[str, str] = {}
    metadata: dict[str, str] = {}
    extra = [c for c in table.column_names if c not in REQUIRED_COLUMNS]
    for line, row in enumerate(rows, start=2):  # line 1 of a CSV is its header
        key, group = row["key"], row["group"]
        if not key or group is None or str(group).strip() == "":
            raise DataError(
                f"{uri}: row {line - 1} has an empty key or group ({row['key']!r}, "
                f"{row['group']!r}); every row needs both"
            )
        key, group = str(key), str(group).strip()
        if groups.get(key, group) != group:
            raise DataError(
                f"{uri}: image {key!r} is listed twice with different groups "
                f"({groups[key]!r} and {group!r}); keep one row per image"
            )
        groups[key] = group
        if extra:
            metadata[key] = json.dumps({c: row[c] for c in extra}, default=str, sort_keys=True)
    return GroupTable(uri, groups, metadata)


def apply_group_table(
    candidates: list[Candidate], table: GroupTable
) -> tuple[list[Candidate], list[str]]:
    """Candidates with the table's groups; and the table's keys that match no image."""
    known = {c.key for c in candidates}
    unmatched = sorted(k for k in table.groups if k not in known)
    grouped = [
        replace(c, group=table.groups[c.key], metadata=table.metadata.get(c.key))
        if c.key in table.groups
        else c
        for c in candidates
    ]
    return grouped, unmatched


def _read_table(uri: str) -> pa.Table:
    parent, _, name = uri.rstrip("/").rpartition("/")
    try:
        data = open_storage(parent or ".").get_bytes(name)
    except ObjectNotFoundError:
        raise DataError(
            f"prepare.groups_table: {uri} does not exist; give the path or s3:// URI of a "
            "CSV or Parquet file with the columns key,group"
        ) from None
    lower = name.lower()
    try:
        if lower.endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        if lower.endswith(".csv"):
            # Groups and keys are names, never numbers: read every column as text.
            options = pacsv.ConvertOptions(column_types={c: pa.string() for c in REQUIRED_COLUMNS})
            return pacsv.read_csv(io.BytesIO(data), convert_options=options)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{uri}: cannot read the groups table: {err}") from None
    raise DataError(
        f"prepare.groups_table: {uri} must end in .csv or .parquet "
        "(a table with the columns key,group)"
    )
