"""Read an offline W&B run's ``.wandb`` file: wandb's own protobuf records, in its log format.

The installed wandb (0.17+) writes offline runs through its Go core and no longer ships the
Python reader (``wandb.sdk.internal.datastore``); an offline run's summary lives only in this
file. The format is LevelDB's log format under a 7-byte header (``:W&B``, magic 0xBEE1, version
0): 32 KiB blocks of chunks, each ``crc32 (4) | length (2) | type (1) | data``, with type 1 a
whole record and 2/3/4 its first/middle/last parts; the CRC covers the type byte and the data.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list:
    """Every ``wandb_internal_pb2.Record`` in the file, in order (CRC-checked)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a .wandb file"
    pos, parts, records = HEADER.size, b"", []
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + CHUNK.size : pos + CHUNK.size + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at {pos}"
        pos += CHUNK.size + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts + chunk if kind == LAST else chunk)
            records.append(record)
            parts = b""
        else:
            parts = chunk if kind == FIRST else parts + chunk
    return records


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def run_info(path: str | Path) -> dict:
    """``name, group, tags, job_type, config`` (nested dict), ``summary`` (flat: a logged
    table's or image's fields as ``<key>/<field>``),
    ``exit_code`` (None if the run never finished), ``artifacts`` (type, name, aliases, files)."""
    info: dict = {"config": {}, "summary": {}, "exit_code": None, "artifacts": []}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            info.update(name=run.display_name, group=run.run_group, job_type=run.job_type)
            info["tags"] = list(run.tags)
            _update(info["config"], run.config.update)
        elif kind == "config":
            _update(info["config"], record.config.update)
        elif kind == "summary":
            for item in record.summary.update:
                info["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
        elif kind == "artifact":
            art = record.artifact
            files = [Path(e.path).name for e in art.manifest.contents]
            info["artifacts"].append(
                {"type": art.type, "name": art.name, "aliases": list(art.aliases), "files": files}
            )
    return info


def _update(config: dict, items) -> None:
    for item in items:
        value = json.loads(item.value_json)
        # wandb stores each top-level key as {"value": ..., "desc": ...}
        config[_key(item)] = value.get("value", value) if isinstance(value, dict) else value
