"""Read back what W&B writes in offline mode, without a network or an account.

wandb 0.31 ships no Python reader for its run files, and offline runs write no
`wandb-summary.json` / `config.yaml` / `wandb-history.jsonl`. Everything lives in
`offline-run-<ts>-<id>/run-<id>.wandb`, a LevelDB-style log:

    file   = header, then 32 KiB blocks
    header = b":W&B" + uint16 LE 0xBEE1 + uint8 version 0            (7 bytes)
    chunk  = uint32 LE crc + uint16 LE length + uint8 type + payload  (7-byte chunk header)
    crc    = zlib.crc32(type byte + payload)  (plain IEEE CRC-32, not masked)
    type   = 1 full | 2 first | 3 middle | 4 last  (a record split across blocks);
             a block tail shorter than a chunk header is zero padding.

Each reassembled record is a `wandb.proto.wandb_internal_pb2.Record`; values inside
run/config/history/summary records are JSON strings (`value_json`), keyed by `key` or by a
`nested_key` path for nested dicts. The format was established by writing runs with 0.31
and checking every CRC; tests/test_wandb_offline.py writes real runs and reads them back.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

MAGIC = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class OfflineRunError(ValueError):
    """A run directory or .wandb file that cannot be read; the message names the path."""


@dataclass
class OfflineRun:
    id: str
    project: str
    group: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)  # user config; wandb's own `_wandb` key left out
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged step, with `_step`
    summary: dict[str, Any] = field(default_factory=dict)  # final summary after all updates
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    exit_code: int | None = None  # None: no exit record (still running, or killed)
    resume: bool = False  # wandb.init(resume="allow" or "must"): `wandb sync` continues the run of that id
    metrics: dict[str, str] = field(default_factory=dict)  # define_metric: name or glob -> its step metric
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # {name, type, aliases, files: {path: digest}}
    path: Path | None = None  # the .wandb file read


def find_offline_runs(root: Path) -> list[Path]:
    """All `offline-run-*` directories below `root`, sorted; symlinks such as `latest-run` are not followed."""
    root = Path(root)
    if not root.is_dir():
        raise OfflineRunError(f"{root}: not a directory")
    found = []
    for parent, dirs, _ in os.walk(root, followlinks=False):
        for d in dirs:
            path = Path(parent) / d
            if d.startswith("offline-run-") and not path.is_symlink():
                found.append(path)
    return sorted(found)


def read_offline_run(run_dir: Path) -> OfflineRun:
    """Replay the records of one offline run directory into its final state."""
    path = _wandb_file(Path(run_dir))
    run: OfflineRun | None = None
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    exit_code = None
    for rec in _records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run = OfflineRun(id=r.run_id, project=r.project, group=r.run_group, name=r.display_name,
                             job_type=r.job_type, tags=list(r.tags), resume=r.resume, path=path)
            _apply(config, r.config.update, r.config.remove)
            _apply(summary, r.summary.update, r.summary.remove)
        elif kind == "config":
            _apply(config, rec.config.update, rec.config.remove)
        elif kind == "summary":
            _apply(summary, rec.summary.update, rec.summary.remove)
        elif kind == "history":
            _append_step(history, _items(rec.history.item))
        elif kind == "exit":
            exit_code = rec.exit.exit_code
        elif kind == "metric" and run is not None:
            run.metrics[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
        elif kind == "artifact" and run is not None:
            a = rec.artifact
            run.artifacts.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                  "metadata": json.loads(a.metadata) if a.metadata else {},
                                  "files": {e.path: e.digest for e in a.manifest.contents}})
    if run is None:
        raise OfflineRunError(f"{path}: no run record (file empty or cut before wandb.init finished)")
    config.pop("_wandb", None)
    run.config, run.summary, run.history, run.exit_code = config, summary, history, exit_code
    return run


def _wandb_file(run_dir: Path) -> Path:
    files = sorted(run_dir.glob("run-*.wandb"))
    if len(files) != 1:
        raise OfflineRunError(f"{run_dir}: expected exactly one run-<id>.wandb file, found {len(files)}")
    return files[0]


def _records(path: Path) -> Iterator[pb.Record]:
    for payload in _payloads(path.read_bytes(), path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def _payloads(data: bytes, path: Path) -> Iterator[bytes]:
    """Reassemble records from chunks. A torn last chunk (run still writing, or killed) ends the log quietly."""
    if data[: len(MAGIC)] != MAGIC:
        raise OfflineRunError(f"{path}: not a W&B run log (header {data[:7]!r}, expected {MAGIC!r})")
    pos, parts = len(MAGIC), []
    while True:
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER.size:  # zero padding at the end of a block
            pos += room
            continue
        if pos + CHUNK_HEADER.size > len(data):
            return
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        start, pos = pos + CHUNK_HEADER.size, pos + CHUNK_HEADER.size + length
        if pos > len(data):
            return
        if kind == 0 and length == 0 and crc == 0:  # preallocated zeros
            continue
        payload = data[start:pos]
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise OfflineRunError(f"{path}: CRC mismatch in chunk at byte {start - CHUNK_HEADER.size}")
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE:
            parts.append(payload)
        elif kind == LAST:
            yield b"".join(parts + [payload])
            parts = []
        else:
            raise OfflineRunError(f"{path}: unknown chunk type {kind} at byte {start - CHUNK_HEADER.size}")


def _key_path(item) -> list[str]:
    return list(item.nested_key) or [item.key]


def _set(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _delete(tree: dict[str, Any], keys: list[str]) -> None:
    for k in keys[:-1]:
        tree = tree.get(k)
        if not isinstance(tree, dict):
            return
    tree.pop(keys[-1], None)


def _apply(tree: dict[str, Any], updates, removes) -> None:
    for item in updates:
        _set(tree, _key_path(item), json.loads(item.value_json))
    for item in removes:
        _delete(tree, _key_path(item))


def _items(items) -> dict[str, Any]:
    row: dict[str, Any] = {}
    _apply(row, items, ())
    return row


def _append_step(history: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """One dict per step: a record repeating the previous `_step` extends that step instead of adding one."""
    if history and "_step" in row and history[-1].get("_step") == row["_step"]:
        history[-1].update(row)
    else:
        history.append(row)
