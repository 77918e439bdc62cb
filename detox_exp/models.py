"""Loading the policy (seq2seq LM + LoRA) and tokenizers, with clear errors for bad input."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
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

# Model types whose attention takes ``position_bias`` (T5's relative attention bias).
T5_TYPES = ("t5", "mt5")


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
    if not 0 <= dropout < 1:
        raise ConfigError(
            "model.lora.lora_dropout", f"must be in [0, 1), got {dropout}", "use e.g. 0.05"
        )


def load_policy(
    name_or_path: str,
    lora: Any | None = None,
    full_finetune: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    torch_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load an encoder-decoder LM and wrap it with LoRA adapters (a ``peft.PeftModel``).

    With ``full_finetune`` the plain model is returned and every weight trains. LoRA's
    initial weights come from torch's global RNG, so it is seeded here for reproducibility.
    """
    field = "model.name_or_path"
    config = load_config(name_or_path, field, revision, trust_remote_code)
    if not getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            field,
            f"{name_or_path!r} is a {config.model_type!r} model, not an encoder-decoder",
            "use a seq2seq checkpoint such as google/flan-t5-base",
        )
    attention = {}
    if config.model_type in T5_TYPES and SWITCHES.t5_attention:
        register_attention()
        attention["attn_implementation"] = ATTENTION
    model = AutoModelForSeq2SeqLM.from_pretrained(
        name_or_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=torch_dtype,
        **attention,
    )
    if SWITCHES.fused_gelu:
        fuse_activations(model)
    if full_finetune:
        return model
    if lora is None:
        raise ConfigError(
            "model.lora", "no LoRA config", "set model.lora or model.full_finetune=true"
        )
    from peft import get_peft_model

    check_lora(lora)
    torch.manual_seed(seed)
    return get_peft_model(model, lora)
