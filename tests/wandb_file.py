"""Read an offline W&B run file (``run-*.wandb``): a LevelDB-style log of protobuf records."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # ":W&B" + magic 0xBEE1 (little endian) + version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_wandb_records(path: Path) -> dict[str, Any]:
    """Config (merged), history keys and summary keys found in an offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    config: dict[str, Any] = {}
    run: dict[str, Any] = {}
    history_keys: set[str] = set()
    summary_keys: set[str] = set()
    exit_code = None
    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
        elif kind == "history":
            history_keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "summary":
            summary_keys |= {
                item.key or "/".join(item.nested_key) for item in record.summary.update
            }
        elif kind == "exit":
            exit_code = record.exit.exit_code
        elif kind == "run":
            run = {
                "id": record.run.run_id,
                "group": record.run.run_group,
                "job_type": record.run.job_type,
                "tags": list(record.run.tags),
                "name": record.run.display_name,
            }
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
    config = {
        k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()
    }
    return {
        "config": config,
        "run": run,
        "history_keys": history_keys,
        "summary_keys": summary_keys,
        "exit_code": exit_code,
    }


def read_history(path: Path) -> tuple[int | None, dict[int, dict[str, Any]]]:
    """(the step the run was rewound to, or None; {step: that step's logged values}) of one
    offline run file; records of one step are merged, as W&B merges them."""
    from wandb.proto import wandb_internal_pb2 as pb

    branch, rows = None, {}
    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run" and record.run.HasField("branch_point"):
            branch = int(record.run.branch_point.value)
        elif kind == "history":
            row = {
                (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.setdefault(int(row["_step"]), {}).update(row)
    return branch, rows


def replay_history(paths: list[Path]) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """The history W&B holds after the run files ``paths`` (in the order written) are
    synced: a rewind drops the steps after its branch point. Also returns the steps logged
    again without a rewind in between (W&B would keep their first values)."""
    history: dict[int, dict[str, Any]] = {}
    repeated = []
    for path in paths:
        branch, rows = read_history(path)
        if branch is not None:
            history = {step: row for step, row in history.items() if step <= branch}
        for step, row in rows.items():
            if step in history:
                repeated.append(step)
            else:
                history[step] = row
    return history, repeated


def read_metric_definitions(path: Path) -> dict[str, dict[str, Any]]:
    """``run.define_metric`` definitions in an offline run file: {name or glob: {step_metric,
    hidden, summary: [the summary aggregations set]}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    definitions = {}
    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "metric":
            continue
        metric = record.metric
        summary = [f.name for f, value in metric.summary.ListFields() if value]
        definitions[metric.name or metric.glob_name] = {
            "step_metric": metric.step_metric,
            "hidden": metric.options.hidden,
            "summary": summary,
        }
    return definitions


def read_artifacts(path: Path) -> list[dict[str, Any]]:
    """Artifacts logged in an offline run file: name, type, description, metadata, aliases
    and the paths in their manifest."""
    from wandb.proto import wandb_internal_pb2 as pb

    artifacts = []
    for payload in iter_payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "artifact":
            continue
        artifact = record.artifact
        artifacts.append(
            {
                "name": artifact.name,
                "type": artifact.type,
                "description": artifact.description,
                "metadata": json.loads(artifact.metadata or "{}"),
                "aliases": list(artifact.aliases),
                "paths": sorted(entry.path for entry in artifact.manifest.contents),
            }
        )
    return artifacts
