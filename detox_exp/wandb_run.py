"""The W&B run's settings: its mode (online when logged in, else offline, unless configured),
its readable name from the job's overrides, and a model artifact's metadata within W&B's
limit. :class:`detox_exp.tracking.Tracker` reads them when it starts a run."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from detox_exp import metric_names as M

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
# WANDB_MODE spellings W&B also accepts, and the mode each means
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
# overrides left out of the run name: where things go and how, not what runs
NAME_SKIPPED = ("hydra", "logger", "paths", "task_name", "resume", "torch_threads")
NAME_MAX_CHARS = 128


def wandb_logged_in() -> bool:
    """Whether W&B has credentials, read as ``wandb.init`` reads them but without a prompt or
    a server: WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE, this process's ``wandb.login``, the
    netrc entry ``wandb login`` writes for the W&B host (``NETRC`` or ``~/.netrc``), or an
    ``api_key`` in the W&B settings."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        import wandb

        try:
            from wandb.sdk.lib import wbauth  # wandb >= 0.24
        except ImportError:  # wandb < 0.24: settings' api_key, then the netrc entry
            from wandb.sdk.lib import apikey

            return bool(apikey.api_key(wandb.setup().settings))
        from wandb.sdk import wandb_setup

        settings = wandb_setup.singleton().settings
        host = settings.base_url
        return bool(
            wbauth.session_credentials(host=host)
            or wbauth.read_netrc_auth(host=host)
            or settings.api_key
        )
    except Exception as err:  # an unreadable netrc, a malformed key...: as if logged out
        log.warning("could not read W&B credentials (%s); W&B runs offline", err)
        return False


def choose_wandb_mode(
    configured: str | None,
    environ: Mapping[str, str],
    logged_in: Callable[[], bool] = wandb_logged_in,
) -> str:
    """The W&B mode: ``configured`` (logger.wandb.mode) when set, else WANDB_MODE (or
    ``disabled`` for WANDB_DISABLED=true), else online when ``logged_in()`` (W&B has
    credentials), else offline."""
    if configured:
        return configured
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    env_mode = WANDB_MODE_ALIASES.get(env_mode, env_mode)
    if env_mode in WANDB_MODES:
        return env_mode
    if env_mode:
        log.warning("WANDB_MODE=%s is not one of %s; ignored", env_mode, WANDB_MODES)
    if environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    return "online" if logged_in() else "offline"


def run_name(task_name: str, overrides: Sequence[str], groups: Collection[str] = ()) -> str:
    """A readable W&B run name: the task, then the job's command-line overrides, a config
    group's by its option alone: ``demo rloo seed=1`` for ``experiment=demo ppo=rloo seed=1``
    (``groups``: Hydra's config groups, e.g. ``ppo``). Leaves out the experiment when it is
    the task, and overrides of hydra, logger, paths, task_name, resume and torch_threads."""
    words = [task_name]
    for override in overrides:
        key, sep, value = override.lstrip("+").partition("=")
        root = re.split(r"[./]", key.lstrip("~"), maxsplit=1)[0]
        if root in NAME_SKIPPED or (key == "experiment" and value == task_name):
            continue
        words.append(value if sep and key in groups else override.lstrip("+"))
    return " ".join(w for w in words if w)[:NAME_MAX_CHARS]


def hydra_run_name(task_name: str) -> str | None:
    """:func:`run_name` of the running Hydra job, or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return run_name(task_name, list(hydra_cfg.overrides.task), set(hydra_cfg.runtime.choices))


# W&B refuses an artifact with more metadata keys (wandb.sdk.artifacts._validators)
WANDB_MAX_METADATA_KEYS = 100


def model_metadata(summary: Mapping[str, Any], identity: Mapping[str, Any]) -> dict[str, Any]:
    """A model artifact's metadata: ``identity`` (the config keys that define the model), then
    the headline metrics ``metric_names.MODEL_METADATA_METRICS`` that ``summary`` holds as
    finite numbers (W&B refuses inf), at most ``WANDB_MAX_METADATA_KEYS`` keys."""
    metrics = {
        key: summary[key]
        for key in M.MODEL_METADATA_METRICS
        if isinstance(summary.get(key), (int, float)) and math.isfinite(summary[key])
    }
    items = list({**identity, **metrics}.items())
    if len(items) > WANDB_MAX_METADATA_KEYS:
        log.warning("model artifact: %d metadata keys, keeping the first 100", len(items))
    return dict(items[:WANDB_MAX_METADATA_KEYS])
