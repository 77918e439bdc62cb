"""Did you mean...: the known keys closest to an unknown config key.

Hydra refuses ``ppo.lerning_rate=1e-4`` (no such key); a check refuses ``+ppo.lerning_rate
=1e-4`` (a key the PPO schema does not know). Both end as the same one line, naming the
closest keys of the config composed from the same command line without that key
(:func:`with_suggestions`, called by the CLI): ``ppo.optimizer.lr``. Adding a key with
``+key=...`` is advised only where the node's ``_target_`` takes that argument (e.g.
``+model.lora.use_rslora=true``), so the advice never leads into the second refusal.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from detox_exp.errors import UnknownKeyError, exception_chain

# Names users bring from trl / transformers (and SB3, cleanrl) for settings this config
# spells otherwise: the last part of their key -> the last part(s) of ours, likeliest first.
KEY_SYNONYMS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("optimizer.lr", "lr"),  # transformers TrainingArguments, trl configs
    "epochs": ("ppo_epochs",),  # trl < 0.12 PPOConfig.ppo_epochs
    "num_ppo_epochs": ("ppo_epochs",),  # trl >= 0.12 PPOConfig
    "num_train_epochs": ("ppo_epochs", "epochs"),  # transformers TrainingArguments
    "num_steps": ("steps",),
    "total_steps": ("steps",),
    "max_steps": ("steps",),  # transformers TrainingArguments
    "beta": ("kl_coef",),  # trl GRPOConfig / DPOConfig: the KL coefficient
    "init_kl_coef": ("kl_coef",),  # trl < 0.12 PPOConfig: the adaptive controller's start
    "kl_penalty": ("kl_estimator",),  # trl < 0.12 PPOConfig: kl, abs, mse, full
    "num_generations": ("samples_per_prompt",),  # trl GRPOConfig: the group size
    "epsilon": ("cliprange",),  # trl GRPOConfig: the ratio clip
    "gae_lambda": ("lam",),  # SB3, cleanrl
    "max_length": ("max_new_tokens",),  # transformers generate (decoder length, seq2seq)
    "response_length": ("max_new_tokens",),  # trl >= 0.12 PPOConfig
    "max_completion_length": ("max_new_tokens",),  # trl GRPOConfig
    "model_name": ("name_or_path",),  # trl < 0.12 PPOConfig
    "model_name_or_path": ("name_or_path",),  # transformers / trl example scripts
}
MAX_CHOICES = 8  # a node with more keys than this is not listed in full in the one line
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def key_scores(key: str, known: Iterable[str]) -> dict[str, float]:
    """How close each key of ``known`` (dotted) is to the unknown ``key``: the mean
    similarity of the whole dotted keys and of their last parts, plus 0.2 for a key under
    the same node, plus 1 for our name of a :data:`KEY_SYNONYMS` name under that node
    (typos in it forgiven; 0.75 for its second choice). Hydra's own keys (``_target_``...)
    are left out."""
    prefix, _, last = key.rpartition(".")
    under = f"{prefix}." if prefix else ""
    alias = difflib.get_close_matches(last, KEY_SYNONYMS, n=1, cutoff=0.8)
    ours = KEY_SYNONYMS[alias[0]] if alias else ()
    scores = {}
    for k in dict.fromkeys(known):
        k_last = k.rpartition(".")[2]
        if k_last.startswith("_"):
            continue
        score = (_ratio(key, k) + _ratio(last, k_last)) / 2
        if k.startswith(under):
            score += 0.2 if under else 0.0
            meant = [i for i, t in enumerate(ours) if k == under + t or k.endswith(f".{t}")]
            score += 1.0 - 0.25 * meant[0] if meant else 0.0
        scores[k] = score
    return scores


def similar_keys(key: str, known: Iterable[str], limit: int = 3) -> list[str]:
    """The keys of ``known`` closest to the unknown ``key`` (:func:`key_scores`), best
    first: at most ``limit``, each scoring at least 0.78 and within 0.15 of the best
    (``ppo.lerning_rate`` -> ``ppo.optimizer.lr``; ``ppo.xyzzy`` -> none)."""
    scores = key_scores(key, known)
    best = max(scores.values(), default=0.0)
    close = {k: v for k, v in scores.items() if v >= max(0.78, best - 0.15)}
    return sorted(close, key=lambda k: (-close[k], k))[:limit]


def config_keys(cfg: Any) -> list[str]:
    """Every leaf key of a config (an OmegaConf node or plain mappings), dotted, in order;
    an interpolation is a leaf (``model.policy.lora: ${model.lora}``)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg

    def walk(node: Mapping[str, Any], prefix: str) -> Iterable[str]:
        for name, value in node.items():
            if isinstance(value, Mapping) and value:
                yield from walk(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    return list(walk(node, ""))


def _keyword_parameters(target: Callable[..., Any]) -> tuple[set[str], bool] | None:
    """The names ``target`` takes as keyword arguments, and whether it takes ``**kwargs``;
    None where its signature cannot be read."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in parameters if p.kind in kinds}
    return names, any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def takes(target: Callable[..., Any], name: str) -> bool:
    """Whether ``target`` (a class: its constructor) takes the keyword argument ``name``
    (a parameter of that name, or ``**kwargs``); True where the signature cannot be read."""
    found = _keyword_parameters(target)
    return found is None or found[1] or name in found[0]


def parameter_names(target: Callable[..., Any]) -> list[str]:
    """The keyword parameters of ``target`` ([] where its signature cannot be read)."""
    found = _keyword_parameters(target)
    return sorted(found[0]) if found else []


def addable_for(node: Any, key: str) -> str | None:
    """The ``_target_`` of ``node`` (a plain config mapping) where its signature names the
    parameter ``key``: ``+<node>.<key>=...`` then adds an argument the checks accept
    (``+model.lora.use_rslora=true``). None otherwise, for a target that only takes
    ``**kwargs`` too (nothing says that it uses the key)."""
    from hydra.utils import get_object

    if not isinstance(node, Mapping) or not isinstance(node.get("_target_"), str):
        return None
    if key in HYDRA_KEYS:
        return None
    try:
        found = _keyword_parameters(get_object(node["_target_"]))
    except Exception:  # not importable: no advice
        return None
    return node["_target_"] if found and key in found[0] else None


def unknown_key(err: BaseException) -> tuple[str, bool] | None:
    """The unknown key ``err`` reports (in its chain), and whether it was added to the config
    (an :class:`UnknownKeyError` of a check) rather than refused by Hydra; None if none."""
    from hydra.errors import ConfigCompositionException

    for item in exception_chain(err):
        if isinstance(item, UnknownKeyError) and item.added_for is None:
            return item.field, True
        if isinstance(item, ConfigCompositionException):
            found = re.search(r"Could not override '([^']+)'", str(item))
            if found:
                return found.group(1), False
    return None


def overrides_without(key: str, argv: Sequence[str]) -> tuple[str, list[str]]:
    """The config name and the overrides of a ``detox-exp`` command line (``argv``, without
    the program), less those that set ``key`` and Hydra's own (``hydra.*``, which do not
    change the job's keys); a sweep (``seed=1,2``, ``ppo=grpo,rloo``) keeps its first value
    (one job's keys), one that cannot be listed (``interval(...)``) is left out."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, extra = get_args_parser().parse_known_args(list(argv))
    lines = [*args.overrides, *(e for e in extra if not e.startswith("-"))]
    kept = []
    for override in OverridesParser.create().parse_overrides(lines):
        name = override.key_or_group
        if name == key or name == "hydra" or name.startswith(("hydra.", "hydra/")):
            continue
        if override.is_sweep_override():
            try:
                first = next(iter(override.sweep_string_iterator()))
            except Exception:  # an interval or glob sweep: its values cannot be listed
                continue
            kept.append(f"{override.get_key_element()}={first}")
        else:
            kept.append(override.input_line)
    return args.config_name or "config", kept


def compose(config_dir: str, config_name: str, overrides: list[str]) -> Any:
    """The job config of ``overrides`` (Hydra's compose API; any earlier Hydra state, e.g.
    of the ``@hydra.main`` that failed, is cleared first)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=config_dir):
        return compose(config_name, overrides=overrides)


def with_suggestions(err: BaseException, config_dir: str, argv: Sequence[str]) -> BaseException:
    """For an unknown key in ``err``'s chain, refused by Hydra (``ppo.lerning_rate=1e-4``)
    or by a check after ``+ppo.lerning_rate=1e-4``: an :class:`UnknownKeyError` naming the
    closest keys of the config that ``argv`` composes without that key, or the ``+key=``
    that adds it where the node's target takes it (only for a key Hydra refused); failing
    both, the keys of a small node (``model.generation``). Chained to ``err``. Else, or
    where that config does not compose, ``err`` itself."""
    from omegaconf import OmegaConf

    found = unknown_key(err)
    if found is None:
        return err
    key, added = found
    try:
        cfg = compose(config_dir, *overrides_without(key, argv))
    except Exception:  # the line without suggestions rather than a second error
        return err
    known = [k for k in config_keys(cfg) if k != key and not k.startswith(f"{key}.")]
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else None
    plain = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_dict(node) else None
    target = None if added else addable_for(plain, last)
    suggestions = [] if target else similar_keys(key, known)
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    siblings = [k for k in siblings if not k.rpartition(".")[2].startswith("_")]
    choices = siblings if parent and len(siblings) <= MAX_CHOICES else []
    better = UnknownKeyError(key, suggestions, target, choices)
    better.__cause__ = err
    return better
