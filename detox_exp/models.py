"""Loading the policy (seq2seq LM + LoRA) and tokenizers, with clear errors for bad input.

Any Hugging Face encoder-decoder LM loads (tested: T5, mT5, BART). At load time
- ``model.lora.target_modules: auto`` becomes the model's attention query / value projections
  (:data:`AUTO_TARGETS`: ``q, v`` in the T5 family, ``q_proj, v_proj`` in BART and most
  others), and targets that match no module are a one-line error listing the linear layers;
- ``precision=fp16`` is refused for the T5 family (:func:`check_precision`);
- a checkpoint whose config says ``tie_word_embeddings: false`` must load with an lm_head of
  its own (:func:`check_untied`);
- the T5-only fast paths (``fast.t5_attention``, ``fast.step_decoder``) are off for other
  architectures, said in one info line.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from detox_exp.errors import ConfigError, DataError
from detox_exp.fast import SWITCHES
from detox_exp.fast.activations import fuse_activations
from detox_exp.fast.attention import ATTENTION, register_attention
from detox_exp.utils import is_local_path

log = logging.getLogger(__name__)

# Model types whose attention takes ``position_bias`` (T5's relative attention bias), and
# whose models the T5-only fast paths mirror (fast.t5_attention, fast.step_decoder).
T5_TYPES = ("t5", "mt5")
# The T5 family: activations overflow fp16's range (T5 was trained in bf16; transformers
# issue 23918), so precision=fp16 is refused for them.
T5_FAMILY = ("t5", "mt5", "umt5", "longt5", "switch_transformers")
# ``model.lora.target_modules: auto``: the first pair of attention query / value projection
# names that the model's linear layers have (T5 family: q, v; BART, mBART, Marian, Pegasus:
# q_proj, v_proj; ...), LoRA's original placement (Hu et al. 2021).
AUTO_TARGETS = (("q", "v"), ("q_proj", "v_proj"), ("query", "value"), ("query_proj", "value_proj"))


def check_source(name_or_path: str, field: str) -> None:
    """A local path must exist; hub ids are resolved by transformers."""
    if is_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise DataError(
            field,
            f"local model dir {name_or_path} does not exist",
            "check the path or use a hub id",
        )


def load_config(
    name_or_path: str, field: str, revision: str | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    check_source(name_or_path, field)
    try:
        return AutoConfig.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            field,
            f"cannot load a model config from {name_or_path!r} ({first})",
            "check the path / hub id, network access, or the HF cache with HF_HUB_OFFLINE=1",
        ) from err


def load_tokenizer(
    name_or_path: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    field: str = "model.name_or_path",
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; seq2seq prompts are padded on the right (T5 convention)."""
    check_source(name_or_path, field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise DataError(
            field, f"cannot load a tokenizer from {name_or_path!r}", "check the path or hub id"
        ) from err
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            field, "the tokenizer has no pad token", "use a tokenizer with a pad token"
        )
    return tokenizer


def check_lora(lora: Any) -> None:
    """Ranges of the LoRA settings (``model.lora``; a mapping or a peft ``LoraConfig``)."""
    get = lora.get if isinstance(lora, dict) else lambda key, default=None: getattr(lora, key)
    r, alpha, dropout = get("r", 8), get("lora_alpha", 8), get("lora_dropout", 0.0)
    for key, value in (("r", r), ("lora_alpha", alpha), ("lora_dropout", dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"model.lora.{key}", f"must be a number, got {value!r}", "fix it")
    if not isinstance(r, int) or r < 1:
        raise ConfigError("model.lora.r", f"must be an integer >= 1, got {r}", "use e.g. 16")
    if alpha <= 0:
        raise ConfigError("model.lora.lora_alpha", f"must be > 0, got {alpha}", "use e.g. 16")
    if dropout != 0:  # see conf/model/flan_t5_base.yaml
        raise ConfigError(
            "model.lora.lora_dropout",
            f"must be 0, got {dropout} (the policy runs without dropout: the rollout's "
            "log-probs have none, and dropout in the update would make the ratio pi_new / "
            "pi_old compare two different random sub-networks)",
            "set model.lora.lora_dropout=0",
        )


def check_precision(config: PretrainedConfig, precision: str | None) -> None:
    """``precision=fp16`` is refused for T5-family policies: their activations overflow
    fp16 (inf / NaN; transformers issue 23918)."""
    if precision == "fp16" and config.model_type in T5_FAMILY:
        raise ConfigError(
            "precision",
            f"fp16 overflows in {config.model_type!r} (T5-family) models (transformers "
            "issue 23918)",
            "use precision=bf16 (or fp32)",
        )


def check_policy_precision(
    name_or_path: str,
    precision: str | None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """:func:`check_precision` before any stage runs, from the policy's config alone; a
    config that cannot be read yet (e.g. demo assets not built) is left to
    :func:`load_policy`, which checks again."""
    if precision != "fp16":
        return
    try:
        config = load_config(name_or_path, "model.name_or_path", revision, trust_remote_code)
    except DataError:
        return
    check_precision(config, precision)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's ``nn.Linear`` modules, in order."""
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return list(dict.fromkeys(names))


def resolve_targets(model: nn.Module, targets: Any) -> Any:
    """``model.lora.target_modules`` for ``model``: ``auto`` -> the first pair of
    :data:`AUTO_TARGETS` among its linear layers; a list (peft matches a name or a dotted
    suffix) or a regex (peft full-matches module names) must match a module per target;
    ``all-linear`` is peft's. One-line ConfigError listing the linear layers otherwise."""
    linear = linear_names(model)
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    listing = f"its linear layers: {', '.join(linear)}"
    field = "model.lora.target_modules"
    if targets == "auto":
        for pair in AUTO_TARGETS:
            if set(pair) <= set(linear):
                return list(pair)
        raise ConfigError(
            field,
            f"auto finds no attention query / value projections in this {kind!r} model ({listing})",
            "set model.lora.target_modules to names from that list",
        )
    if targets is None or targets == "all-linear":
        return targets
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        unmatched = sorted(
            t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)
        )
    if unmatched:
        raise ConfigError(
            field,
            f"no module of this {kind!r} model matches {', '.join(map(repr, unmatched))} "
            f"({listing})",
            "use target_modules=auto, or names from that list",
        )
    return targets


def raw_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's config.json as written (transformers' config classes may override
    fields: in transformers 5, T5Config always says ``tie_word_embeddings=True``)."""
    try:
        raw, _ = PretrainedConfig.get_config_dict(name_or_path, revision=revision)
    except (OSError, ValueError):
        return {}
    return raw


def check_untied(model: PreTrainedModel, untied: bool, name_or_path: str) -> None:
    """A checkpoint whose config says ``tie_word_embeddings: false`` (FLAN-T5, mT5) has an
    output projection of its own: loaded as the input embedding, the policy's logits would be
    those of another model."""
    if not untied:
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None:
        return
    if out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr():
        raise DataError(
            "model.name_or_path",
            f"{name_or_path!r} says tie_word_embeddings=false, but its lm_head was loaded as "
            "the shared input embedding (a checkpoint without lm_head.weight, or a "
            "transformers loading bug)",
            "use a checkpoint that stores its own lm_head.weight, or a transformers release "
            "that keeps them untied",
        )


def _attention_kwargs(model_type: str) -> dict[str, str]:
    """``from_pretrained``'s attention setting: the project's T5 attention (``fast.t5_attention``)
    for T5 / mT5; for other models the T5-only switches are off, which the log says."""
    if model_type not in T5_TYPES:
        if SWITCHES.t5_attention or SWITCHES.step_decoder:
            log.info(
                "fast.t5_attention, fast.step_decoder: off for this %r model (T5 / mT5 only); "
                "transformers' own attention and forward decode it",
                model_type,
            )
        return {}
    if not SWITCHES.t5_attention:
        return {}
    register_attention()
    return {"attn_implementation": ATTENTION}


def load_policy(
    name_or_path: str,
    lora: Any | None = None,
    full_finetune: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    torch_dtype: torch.dtype | None = None,
    precision: str | None = None,
) -> PreTrainedModel:
    """Load an encoder-decoder LM and wrap it with LoRA adapters (a ``peft.PeftModel``).

    With ``full_finetune`` the plain model is returned and every weight trains. LoRA's
    initial weights come from torch's global RNG, so it is seeded here for reproducibility.
    ``precision`` (the run's) is checked against the architecture (:func:`check_precision`);
    ``lora.target_modules`` is resolved for it (:func:`resolve_targets`).
    """
    field = "model.name_or_path"
    config = load_config(name_or_path, field, revision, trust_remote_code)
    if not getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            field,
            f"{name_or_path!r} is a {config.model_type!r} model, not an encoder-decoder",
            "use a seq2seq checkpoint such as google/flan-t5-base",
        )
    check_precision(config, precision)
    if lora is not None and not full_finetune:
        check_lora(lora)
    attention = _attention_kwargs(config.model_type)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        name_or_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=torch_dtype,
        **attention,
    )
    untied = raw_config(name_or_path, revision).get("tie_word_embeddings")
    check_untied(model, untied is False or config.tie_word_embeddings is False, name_or_path)
    if SWITCHES.fused_gelu:
        fuse_activations(model)
    if full_finetune:
        return model
    if lora is None:
        raise ConfigError(
            "model.lora", "no LoRA config", "set model.lora or model.full_finetune=true"
        )
    from peft import get_peft_model

    targets = resolve_targets(model, lora.target_modules)
    if targets != lora.target_modules:
        lora = dataclasses.replace(lora, target_modules=targets)
    torch.manual_seed(seed)
    return get_peft_model(model, lora)
