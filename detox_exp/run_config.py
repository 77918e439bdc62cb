"""What a run's config must satisfy before any stage runs (types, ranges, files, the rules
that need several groups), the stage list, and the building of a component from its node.
Each check ends a bad run with one line naming the field and the fix (exit 2), before W&B
starts and before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from detox_exp.errors import ConfigError, DataError
from detox_exp.generation import make_sampling
from detox_exp.guided.settings import check_guide_scale
from detox_exp.hub import check_hub_access
from detox_exp.kl_control import configured_beta
from detox_exp.models import check_lora, check_policy_precision
from detox_exp.ppo.checks import PRECISIONS, check_ppo_config
from detox_exp.schema import check_node, check_value
from detox_exp.training.saving import training_settings
from detox_exp.utils import check_utf8, is_local_path, read_jsonl, resolve_device

# the stages in the order they run (each switched by stages.<name>)
STAGES = ("prepare_data", "train_reward", "evaluate_before", "frontier", "ppo", "evaluate_after")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate`` with plain Python containers (lists and dicts, not OmegaConf nodes).

    Our errors raised inside come wrapped in Hydra's InstantiationException; the CLI finds
    them in the exception chain (errors.bad_input_message)."""
    return instantiate(node, _convert_="all", **kwargs)


def check_writable(run_dir: Path) -> None:
    """The run dir must be creatable and writable before any work starts."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DataError(
            "paths.output_dir",
            f"cannot write to {run_dir} ({err.strerror})",
            "choose a writable hydra.run.dir / hydra.sweep.dir",
        ) from err


def check_data_files(cfg: DictConfig) -> None:
    """Every local data file the config names exists, is readable and is UTF-8, before the
    first stage and before W&B starts (files the demo assets will build are skipped)."""
    named: list[tuple[str, Any]] = [
        ("dataset.path", cfg.dataset.get("path")),
        *((f"dataset.data_files.{k}", v) for k, v in (cfg.dataset.get("data_files") or {}).items()),
    ]
    if cfg.stages.get("train_reward"):
        data = cfg.reward.training.get("data") or {}
        named += [("reward.training.data.path", data.get("path"))]
        named += [
            (f"reward.training.data.data_files.{k}", v)
            for k, v in (data.get("data_files") or {}).items()
        ]
    built = Path(cfg.assets.cache_dir).resolve() if cfg.get("assets") is not None else None
    for field, value in named:
        if not value:
            continue
        path = Path(str(value)).expanduser()
        if built is not None and path.resolve().is_relative_to(built):
            continue  # written by the assets stage
        if path.is_dir():
            continue  # a local dataset folder: read by the datasets library
        if not (is_local_path(str(value)) or path.suffix in (".jsonl", ".json", ".csv")):
            continue  # a hub id
        if not path.is_file():
            raise DataError(field, f"file {value} not found", "check the path")
        try:
            if path.suffix == ".jsonl":  # not UTF-8, not JSON, not an object: names the line
                for _ in read_jsonl(path):
                    pass
            else:
                check_utf8(path, field)
        except PermissionError as err:
            raise DataError(
                field, f"cannot read {value} ({err.strerror})", "fix its permissions"
            ) from None
    check_hub_access(cfg)  # a hub id neither cached nor reachable: one line, no retries


def _check_nodes(cfg: DictConfig) -> None:
    """Every component node the run builds against its target's signature
    (:mod:`detox_exp.schema`), and the LoRA settings."""
    nodes = {
        "model.tokenizer": cfg.model.tokenizer,
        "model.policy": cfg.model.policy,
        "dataset": cfg.dataset,
        "reward.scorer": cfg.reward.scorer,
        "eval": cfg.eval,
        "checkpoint": cfg.checkpoint,
        "logger": cfg.logger,
    }
    if cfg.stages.get("train_reward"):
        nodes["reward.training"] = cfg.reward.training
    if cfg.get("assets") is not None:
        nodes["assets"] = cfg.assets
    if not cfg.model.full_finetune:
        nodes["model.lora"] = cfg.model.lora
    for field, node in nodes.items():
        plain = OmegaConf.to_container(node, resolve=True)
        if field == "model.policy":  # its lora is ${model.lora}: checked as model.lora
            plain.pop("lora", None)
        check_node(plain, field)
        if field == "model.lora":
            check_lora(plain)


def check_run_config(cfg: DictConfig) -> None:
    """Types and ranges of the whole config, before any stage runs: the top-level keys, every
    component node against its target's signature (:mod:`detox_exp.schema`), the PPO
    settings against their schema, and the rules that need several groups."""
    check_value(cfg.seed, int, "seed")
    threads = cfg.torch_threads
    check_value(threads, int | None, "torch_threads")
    if threads is not None and threads < 1:
        raise ConfigError(
            "torch_threads", f"must be >= 1 or null, got {threads}", "use e.g. 2, or null"
        )
    _check_nodes(cfg)
    resolve_device(cfg.device)
    if cfg.precision not in PRECISIONS:
        raise ConfigError("precision", f"unknown {cfg.precision!r}", f"use one of {PRECISIONS}")
    check_policy_precision(
        cfg.model.name_or_path, cfg.precision, cfg.model.revision, cfg.model.trust_remote_code
    )
    if cfg.precision == "fp16" and resolve_device(cfg.device).type != "cuda":
        raise ConfigError("precision", "fp16 needs CUDA", "use precision=bf16 or fp32 on CPU")
    if not isinstance(cfg.keep_freed_memory, bool):
        raise ConfigError(
            "keep_freed_memory", f"must be true or false, got {cfg.keep_freed_memory!r}", "fix it"
        )
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"stages.{sorted(unknown)[0]}", "unknown stage", f"use {list(STAGES)}")
    gen = OmegaConf.to_container(cfg.model.generation, resolve=True)
    make_sampling(gen)  # one-line errors for impossible values
    eval_gen = (
        OmegaConf.to_container(cfg.eval.generation, resolve=True)
        if cfg.eval.get("generation")
        else {}
    )
    make_sampling({**gen, **eval_gen}, "eval.generation")
    if cfg.stages.get("frontier"):
        frontier = OmegaConf.to_container(cfg.frontier, resolve=True)
        check_node(frontier, "frontier")
        get_object(frontier.pop("_target_"))(**frontier)  # its constructor checks its ranges
    controller = OmegaConf.to_container(cfg.ppo.kl_controller, resolve=True)
    frontier_off = not cfg.stages.get("frontier")
    if configured_beta(controller) is None and frontier_off and cfg.stages.get("ppo"):
        raise ConfigError(
            "ppo.kl_controller",
            "ppo/kl_controller=frontier takes beta from the frontier stage, which is off",
            "set stages.frontier=true, or use ppo/kl_controller=fixed",
        )
    if cfg.stages.get("ppo"):
        name, node = training_node(cfg)
        if name == "ppo":
            check_ppo_config(cfg.ppo)
        else:
            check_node(node, "algorithm")
            if "guide_scale" in node:  # algorithm=guided
                check_guide_scale(node["guide_scale"], not frontier_off)
        # a small object whose constructor checks its ranges
        check_node(controller, "ppo.kl_controller")
        get_object(controller.pop("_target_"))(**controller)


ALGORITHMS = ("ppo", "guided")


def training_node(cfg: DictConfig) -> tuple[str, Any]:
    """The training stage's method (``algorithm.name``) and the node that builds its trainer
    (:func:`~detox_exp.training.saving.training_settings`; another algorithm's own node
    resolved, without ``name``)."""
    name, node = training_settings(cfg)
    if name not in ALGORITHMS:
        raise ConfigError("algorithm", f"unknown algorithm {name!r}", f"use one of {ALGORITHMS}")
    if name == "ppo":
        return name, node
    node = OmegaConf.to_container(node, resolve=True)
    node.pop("name")
    return name, node
