"""Read what a WandB offline run logged, from its `run-*.wandb` file, to assert on it in tests.

wandb 0.31 has no reader for these files any more (its wandb.sdk.internal.datastore is gone): each is a LevelDB-log-style
stream of `wandb_internal_pb2.Record` protobufs, a 7-byte header (`:W&B`, version...) then
32 KiB blocks of records, each with a 7-byte header: crc (u32), length (u16), type (1 full,
2 first, 3 middle, 4 last fragment). A record header never starts in a block's last 6 bytes.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER, FILE_HEADER = 32 * 1024, 7, 7


def records(path: Path) -> list:
    data, records_, pending, offset = Path(path).read_bytes(), [], b"", FILE_HEADER
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        payload = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records_.append(record)
    return records_


def logged_rows(path: Path) -> list[dict]:
    """Every wandb.log call's values, JSON-decoded, in order."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records(path) if record.WhichOneof("record_type") == "history"]


def config(path: Path) -> dict:
    """The run's config: every update merged, key -> JSON-decoded value."""
    merged = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged


def run_record(path: Path):
    """The run's own record: project, name, group, tags."""
    return next(record.run for record in records(path) if record.WhichOneof("record_type") == "run")
