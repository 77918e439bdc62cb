"""Small shared helpers: seeding, devices, progress bars, JSON lines."""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from detox_exp.errors import ConfigError, DataError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


# glibc mallopt parameters (malloc.h)


def resolve_device(spec: str | None) -> torch.device:
    """`auto` -> cuda if available else cpu; `cpu`, `cuda`, `cuda:N` as given (checked)."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(
            "device", f"unknown device {spec!r}", "use auto, cpu, cuda or cuda:N"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{spec} requested but CUDA is not available", "set device=cpu")
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise ConfigError("device", f"{spec} does not exist", "pick an index < device count")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"unsupported device {spec!r}", "use auto, cpu or cuda")
    return device


def is_local_path(name_or_path: str) -> bool:
    """True for filesystem paths (absolute, ./, ../, ~, or existing), False for hub ids such
    as org/name."""
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar with rate and ETA on a terminal; silent in CI logs and pipes."""
    quiet = os.environ.get("CI", "").lower() in ("1", "true") or not sys.stderr.isatty()
    kwargs.setdefault("disable", quiet)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def check_utf8(path: str | Path, field: str) -> None:
    """DataError naming the byte offset if the file ``path`` is not valid UTF-8."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                raise DataError(
                    field,
                    f"{path} is not UTF-8 (byte offset {offset + err.start})",
                    "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
                ) from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(
            field, f"{path} is not UTF-8 (it ends inside a character)", "re-encode it as UTF-8"
        ) from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-empty line; malformed lines (not UTF-8, not
    JSON, not an object) raise DataError."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    str(path),
                    f"line {lineno} is not UTF-8 (byte {err.start} of the line: "
                    f"{raw[err.start : err.start + 1]!r})",
                    "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    str(path), f"line {lineno} is not valid JSON ({err.msg})", "fix or remove it"
                ) from err
            if not isinstance(record, dict):
                raise DataError(str(path), f"line {lineno} is not a JSON object", "fix it")
            yield lineno, record


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
