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
from detox_exp.utils import is_local_path

log = logging.getLogger(__name__)

# Model types whose attention takes ``position_bias`` (T5's relative attention bias).
T5_TYPES = ("t5", "mt5")
ATTENTION = "detox_t5"


def t5_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """T5 attention: ``transformers``' SDPA path, except for bf16 / fp16 on CPU.

    There, the CPU flash-attention kernel is slower than two plain matmuls (benchmark T5
    shapes, ``benchmarks/micro.py``: 0.77 vs 0.24 ms per cross-attention decoding step, 6.3
    vs 3.7 ms for an encoder self-attention forward + backward), so the scores come from
    matmuls in the inputs' dtype and the softmax accumulates in fp32 internally; masks and
    position bias are combined as SDPA's path does. The price: the scores are rounded to
    bf16 before the softmax (the flash kernel keeps them in fp32), so the logits' error
    against fp32 is somewhat larger than SDPA's own bf16 error (tests/test_attention.py
    holds it within twice SDPA's).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = q_len > 1 and attention_mask is None and causal
    # Decoding self-attention (one query, a cache that grows every step) stays on SDPA:
    # oneDNN would build and keep a matmul kernel for every cache length (+25 MB RSS). So does
    # a causal prefill longer than the query, which SDPA's path crops.
    decoding = q_len == 1 and getattr(module, "is_causal", False)
    if (
        query.device.type != "cpu"
        or query.dtype == torch.float32
        or decoding
        or (causal and kv_len > q_len)
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )
    if position_bias is None:
        position_bias = query.new_zeros(())
    bias = layer_bias(position_bias, attention_mask, causal, query, key)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2))
    if scale != 1.0:
        scores.mul_(scale)
    if torch.broadcast_shapes(scores.shape, bias.shape) == scores.shape:
        scores.add_(bias)  # in place: a fresh [B, H, q, k] buffer costs more than the add
    else:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def layer_bias(
    position_bias: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """Position bias and mask combined as SDPA's path combines them, in the query's dtype.

    modeling_t5 hands every layer of a pass the same ``position_bias`` and mask tensors, so
    the [B, H, q, k] result is built by the first layer and kept on ``position_bias`` (a
    Python attribute: it lives as long as that pass's bias) for the others. Not kept when the
    bias is trained (full fine-tuning: it would hold its own autograd graph), for inference
    tensors (they have no version counter to check) or when the result is ``position_bias``
    itself (nothing to save, and it would reference itself).
    """
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    tensors = (position_bias,) if attention_mask is None else (position_bias, attention_mask)
    if position_bias.requires_grad or any(t.is_inference() for t in tensors):
        bias = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        return bias.to(query.dtype)
    mask_version = None if attention_mask is None else attention_mask._version
    shape = (query.shape[0], query.shape[2], key.shape[2])
    versions = (position_bias._version, mask_version, causal, query.dtype, shape)
    cached = getattr(position_bias, "_detox_layer_bias", None)
    if cached is not None and cached[0] is attention_mask and cached[1] == versions:
        return cached[2]
    bias = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
    bias = bias.to(query.dtype)
    if bias is not position_bias:
        position_bias._detox_layer_bias = (attention_mask, versions, bias)
    return bias


def register_attention() -> None:
    """Make ``attn_implementation="detox_t5"`` (:func:`t5_attention`) known to transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, t5_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


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


class FusedGELUTanh(torch.nn.Module):
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) in one kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def fuse_activations(model: torch.nn.Module) -> int:
    """Swap ``gelu_new`` modules (T5 v1.1 / FLAN-T5's gated-gelu) for the same tanh-GELU as
    one fused kernel; returns how many were swapped.

    ``NewGELUActivation`` evaluates the formula in six elementwise ops; ``F.gelu(x,
    approximate="tanh")`` computes the same function in one (outputs agree to ~1e-6). This
    makes a full forward pass of the benchmark T5 ~20% faster on CPU. Only the modules change,
    not the config, so saved models are unaffected.
    """
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, FusedGELUTanh())
                swapped += 1
    return swapped


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
    if config.model_type in T5_TYPES:
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
