"""Saving a trained policy: adapter, value head, merged model and a model card."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel, PreTrainedTokenizerBase

from detox_exp import metric_names as M
from detox_exp.ppo.policy import ActorCritic


def model_card(summary: Mapping[str, Any], config: Any, eval_table: Sequence[str]) -> str:
    """The merged model's README: what was trained, how, and ``eval_table`` (the
    evaluation's markdown lines, ``evaluation.report.card_table``)."""
    cfg = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
    ppo = cfg["ppo"]
    controller = ppo.get("kl_controller") or {}
    kl_coef = controller.get("kl_coef", controller.get("init_kl_coef"))
    if "target" in controller:
        kl_coef = f"from {kl_coef}, adapted toward a KL of {controller['target']}"
    if "target_drop" in controller:
        beta = summary.get(M.FRONTIER_BETA)
        kl_coef = f"{beta:.4g}" if beta is not None else "-"
        kl_coef += f", the frontier's for a {controller['target_drop']:.0%} cut of the toxicity"
    lines = [
        "# detox_exp PPO policy",
        "",
        f"- base model: `{cfg['model']['name_or_path']}`",
        f"- reward model: `{cfg['reward']['name_or_path']}` "
        f"(reward = {cfg['reward']['reward_type']} of `{cfg['reward']['nontoxic_label']}`)",
        f"- data: `{cfg['dataset']['path']}`",
        f"- PPO steps: {cfg['ppo']['steps']}, batch {cfg['ppo']['batch_size']} samples "
        f"({ppo.get('samples_per_prompt', 1)} per prompt), advantages "
        f"{ppo.get('advantage_estimator', 'gae')}, lr {cfg['ppo']['optimizer']['lr']}",
        f"- KL to the reference: {ppo['kl_estimator']} in the reward (coefficient "
        f"{kl_coef}), {ppo.get('kl_log_estimator', 'k3')} logged as `objective/kl`"
        + (
            f", {ppo['kl_loss_estimator']} in the loss x {ppo['kl_loss_coef']}"
            if ppo.get("kl_loss_coef")
            else ""
        ),
        f"- seed: {cfg['seed']}",
        "",
        "Load with `AutoModelForSeq2SeqLM.from_pretrained(<this folder>)`.",
        "",
        "## Held-out evaluation (toxicity of the response only)",
        "",
    ]
    lines += eval_table
    lines += ["", "## Config", "", "```json", json.dumps(cfg, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def merged_model(policy: ActorCritic, source: Mapping[str, Any] | None = None) -> PreTrainedModel:
    """The policy with its LoRA update merged into FULL-precision base weights, in the dtype
    the base checkpoint is stored in.

    With ``precision=bf16`` the frozen base weights live in bf16 in memory; W + dW rounded to
    bf16 (8 mantissa bits) would lose most of a LoRA update of ~0.1-1% of |W|. So a
    low-precision base is re-read from its checkpoint (``source``: ``name_or_path``,
    ``revision``, ``trust_remote_code``; the model config's ``model`` node), the adapter's
    weights are loaded onto it in fp32, merged there and only then cast to the stored dtype.
    A full-precision base in memory is merged in memory (exact, no re-read)."""
    model = policy.model
    if not policy.is_peft:
        return copy.deepcopy(model)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    if frozen <= {torch.float32, torch.float64}:
        return copy.deepcopy(model).merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    lora = model.peft_config[model.active_adapter]
    source = dict(source or {})
    name = source.get("name_or_path") or lora.base_model_name_or_path
    base = AutoModelForSeq2SeqLM.from_pretrained(
        name,
        revision=source.get("revision"),
        trust_remote_code=bool(source.get("trust_remote_code", False)),
        use_safetensors=True,
        dtype="auto",  # the dtype it is stored in
    )
    stored = base.dtype
    wrapped = get_peft_model(base.float(), copy.deepcopy(lora))
    adapter = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(wrapped, adapter)
    return wrapped.merge_and_unload().to(stored)


def save_policy(
    policy: ActorCritic,
    tokenizer: PreTrainedTokenizerBase,
    save_dir: str | Path,
    summary: Mapping[str, Any],
    config: Any,
    eval_table: Sequence[str] = (),
) -> Path:
    """Write ``adapter/`` (LoRA or full weights), ``value_head.safetensors`` (gae only) and
    ``merged/`` (see :func:`merged_model`)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(save_dir / "adapter", safe_serialization=True)
    if policy.value_head is not None:
        head = policy.value_head.state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        save_file(state, str(save_dir / "value_head.safetensors"))
    cfg = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
    merged = merged_model(policy, (cfg or {}).get("model"))
    merged.save_pretrained(save_dir / "merged", safe_serialization=True)
    tokenizer.save_pretrained(save_dir / "merged")
    card = model_card(summary, config, eval_table)
    (save_dir / "merged" / "README.md").write_text(card)
    (save_dir / "README.md").write_text(card)
    return save_dir
