"""The Hugging Face hub, checked before any stage: a hub id the run needs that is neither in
the local cache nor reachable stops the run at once with one line, instead of after
huggingface_hub's retries (5 per file, 1 + 2 + 4 + 8 + 8 s apart: about 25 s for each file a
model or data set reads, minutes in all).

With the hub unreachable but every id in the local cache, the process switches to offline
mode (:func:`go_offline`), as ``HF_HUB_OFFLINE=1`` would: transformers and datasets then read
the cache without asking the hub. Online but cut off, transformers asks for each file of a
cached model, with the retries, before it falls back to the cache (190 s for the tiny
stand-ins of tests/test_hub_loading.py, 3 s offline).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detox_exp.errors import DataError
from detox_exp.utils import is_local_path

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 4.0
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class HubId:
    """A model or data set the run loads from the hub: the config field that names it."""

    field: str
    repo_id: str
    repo_type: str  # "model" | "dataset"
    revision: str | None = None


def is_hub_id(value: Any) -> bool:
    """A string that names no local path or data file: transformers / datasets would look it
    up on the hub."""
    return (
        isinstance(value, str)
        and bool(value)
        and not is_local_path(value)
        and not value.endswith(DATA_SUFFIXES)
    )


def hub_ids(cfg: Any) -> list[HubId]:
    """The hub ids the configured stages load (local paths, and the demo's assets before
    they are built, are not ids): the policy (its tokenizer is always built), the prompts'
    data set, the reward model (or the one its training starts from, and that training's
    data set)."""
    stages, model, dataset, reward = cfg.stages, cfg.model, cfg.dataset, cfg.reward
    named = [HubId("model.name_or_path", model.name_or_path, "model", model.get("revision"))]
    if stages.get("prepare_data") and not dataset.get("data_files"):
        named.append(HubId("dataset.path", dataset.get("path"), "dataset", dataset.get("revision")))
    if stages.get("train_reward"):
        training = reward.training
        named.append(
            HubId("reward.training.init_from", training.init_from, "model", training.revision)
        )
        data = training.data
        if not data.get("data_files"):
            named.append(HubId("reward.training.data.path", data.get("path"), "dataset"))
    elif any(stages.get(s) for s in ("evaluate_before", "frontier", "ppo", "evaluate_after")):
        named.append(HubId("reward.name_or_path", reward.name_or_path, "model", reward.revision))
    built = Path(cfg.assets.cache_dir).resolve() if cfg.get("assets") is not None else None
    return [
        hub_id
        for hub_id in named
        if is_hub_id(hub_id.repo_id)
        and not (built and Path(hub_id.repo_id).resolve().is_relative_to(built))
    ]


def offline() -> bool:
    """Whether this process runs in huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``,
    read when huggingface_hub is imported, or :func:`go_offline`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Offline mode for the rest of this process, as ``HF_HUB_OFFLINE=1`` at start would
    give: huggingface_hub and datasets read the setting once, at import, into the module
    attributes their functions read at every call (``huggingface_hub.constants``, which
    transformers asks through ``is_offline_mode()``; ``datasets.config``); the variable
    itself for what is imported later and for child processes."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def snapshot(hub_id: HubId, cache_dir: Path | None = None) -> Path | None:
    """The local snapshot folder of ``hub_id`` at its revision (``main`` if none) in the HF
    cache (huggingface_hub's ``HF_HUB_CACHE``), or None."""
    from huggingface_hub import constants

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    repo = cache / f"{hub_id.repo_type}s--{hub_id.repo_id.replace('/', '--')}"
    revision = hub_id.revision or "main"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def _weights_present(folder: Path) -> bool:
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError):
                return False
            return all((folder / shard).is_file() for shard in shards)
    return any((folder / name).is_file() for name in WEIGHTS)


def cached(hub_id: HubId, cache_dir: Path | None = None) -> bool:
    """Whether ``hub_id`` can load from the local cache alone: a model's snapshot holds its
    config.json and weights (every shard), a data set's snapshot holds files."""
    folder = snapshot(hub_id, cache_dir)
    if folder is None:
        return False
    if hub_id.repo_type == "dataset":
        return any(path.is_file() for path in folder.rglob("*"))
    return (folder / "config.json").is_file() and _weights_present(folder)


def endpoint() -> str:
    """The hub endpoint huggingface_hub uses (``HF_ENDPOINT``, read at its import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """One HEAD request to ``url`` through huggingface_hub's HTTP client (its proxies and
    certificates), without retries: None if any answer comes back, else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(url, timeout=timeout, follow_redirects=False)
    except Exception as err:  # no route, DNS, refused, timeout, TLS: the hub is out of reach
        return " ".join(str(err).split()) or type(err).__name__
    return None


def check_hub_access(cfg: Any) -> None:
    """Before any stage: with the hub out of reach (one probe, :data:`PROBE_TIMEOUT_S`), a
    hub id the run needs that the local cache lacks is a one-line DataError naming its
    field; if the cache has them all, the run goes on offline (:func:`go_offline`). Nothing
    to check with ``HF_HUB_OFFLINE=1`` or without hub ids."""
    if offline():
        return
    ids = hub_ids(cfg)
    if not ids:
        return
    url = endpoint()
    reason = probe(url)
    if reason is None:
        return
    missing = next((hub_id for hub_id in ids if not cached(hub_id)), None)
    if missing is not None:
        kind = "data set" if missing.repo_type == "dataset" else "model"
        raise DataError(
            missing.field,
            f"the Hugging Face hub ({url}) cannot be reached (no network: {reason}), and the "
            f"{kind} {missing.repo_id!r} is not in the local cache",
            "connect to the network, or download it once and set HF_HUB_OFFLINE=1 "
            "(it is read from the local cache)",
        )
    names = ", ".join(hub_id.repo_id for hub_id in ids)
    log.warning("the Hugging Face hub (%s) cannot be reached (%s): offline mode", url, reason)
    log.warning("%s: read from the local cache (as with HF_HUB_OFFLINE=1)", names)
    go_offline()
