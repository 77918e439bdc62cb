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
from detox_exp.kl_control import FrontierKLController
from detox_exp.training.policy import ActorCritic
from detox_exp.utils import is_local_path

# the evaluation metrics a card's model-index reports (eval/after/<name>), with their names
CARD_INDEX_METRICS = {
    "toxicity_mean": "mean toxicity (reward classifier)",
    "toxic_fraction": "toxic fraction",
    "rouge_l": "ROUGE-L",
    "distinct_2": "distinct-2",
}


def _kl_coef_text(ppo: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    controller = ppo.get("kl_controller") or {}
    kl_coef = controller.get("kl_coef", controller.get("init_kl_coef"))
    if "target" in controller:
        return f"from {kl_coef}, adapted toward a KL of {controller['target']}"
    if FrontierKLController.configured_by(controller):
        beta = summary.get(M.FRONTIER_BETA)
        text = f"{beta:.4g}" if beta is not None else "-"
        return text + f", the frontier's for a {controller['target_drop']:.0%} cut of the toxicity"
    return str(kl_coef)


def training_settings(cfg: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The training method (``algorithm.name``) and the node of its settings: ``ppo`` for
    PPO, else the ``algorithm`` node."""
    algorithm = (cfg.get("algorithm") or {}).get("name", "ppo")
    return algorithm, cfg["ppo"] if algorithm == "ppo" else cfg["algorithm"]


def model_identity(cfg: Mapping[str, Any], reward_model: str) -> dict[str, Any]:
    """The config keys that define a trained policy (the model card's list and its W&B
    artifact's metadata): base model, the reward model PPO used, data, algorithm and its
    main settings. ``cfg``: the run's resolved config as plain containers."""
    algorithm, node = training_settings(cfg)
    model = cfg["model"]
    identity = {
        "base_model": model["name_or_path"],
        "reward_model": str(reward_model),
        "reward_type": cfg["reward"]["reward_type"],
        "dataset": cfg["dataset"]["path"],
        "algorithm": algorithm,
        "advantage_estimator": node.get("advantage_estimator", "gae")
        if algorithm == "ppo"
        else "none",
        "steps": node["steps"],
        "batch_size": node["batch_size"],
        "samples_per_prompt": node.get("samples_per_prompt", 1),
        "lr": node["optimizer"]["lr"],
        "seed": cfg["seed"],
    }
    if not model.get("full_finetune"):
        lora = model.get("lora") or {}
        identity |= {"lora_r": lora.get("r"), "lora_targets": str(lora.get("target_modules"))}
    return identity


def _method_tag(identity: Mapping[str, Any]) -> str:
    if identity["algorithm"] == "ppo":
        return str(identity["advantage_estimator"])
    return str(identity["algorithm"])


def _hub_id(name: str) -> str | None:
    """``name`` if it is a Hugging Face hub id (org/name), else None (a local path)."""
    return None if is_local_path(str(name)) else str(name)


def card_metadata(
    identity: Mapping[str, Any], summary: Mapping[str, Any], library: str, name: str
) -> str:
    """The Hugging Face front matter (YAML between ``---`` lines) of a policy's card:
    base_model and datasets (hub ids only: a local path is no hub reference), library_name,
    tags, and the held-out evaluation as a model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = _hub_id(identity["dataset"])
    results = [
        EvalResult(
            task_type="summarization",
            task_name="dialogue summarization",
            dataset_type=dataset or "local",
            dataset_name=dataset or str(identity["dataset"]),
            dataset_split="held-out",
            metric_type=metric,
            metric_name=label,
            metric_value=summary[M.eval_key("after", metric)],
        )
        for metric, label in CARD_INDEX_METRICS.items()
        if isinstance(summary.get(M.eval_key("after", metric)), (int, float))
    ]
    data = ModelCardData(
        base_model=_hub_id(identity["base_model"]),
        library_name=library,
        pipeline_tag="text2text-generation",
        tags=["detox_exp", "detoxification", "rlhf", _method_tag(identity)]
        + (["lora"] if "lora_r" in identity else []),
        datasets=[dataset] if dataset else None,
        model_name=name,
        eval_results=results or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _how_trained(
    cfg: Mapping[str, Any], identity: Mapping[str, Any], summary: Mapping[str, Any]
) -> tuple[str, list[str]]:
    """The card's title and its lines on how the method trained the policy."""
    ppo = cfg["ppo"]
    if identity["algorithm"] == "ppo":
        return "# detox_exp PPO policy", [
            f"- PPO steps: {ppo['steps']}, batch {ppo['batch_size']} samples "
            f"({identity['samples_per_prompt']} per prompt), advantages "
            f"{identity['advantage_estimator']}, lr {identity['lr']}",
            f"- KL to the reference: {ppo['kl_estimator']} in the reward (coefficient "
            f"{_kl_coef_text(ppo, summary)}), {ppo.get('kl_log_estimator', 'k3')} logged as "
            "`objective/kl`"
            + (
                f", {ppo['kl_loss_estimator']} in the loss x {ppo['kl_loss_coef']}"
                if ppo.get("kl_loss_coef")
                else ""
            ),
        ]
    node = cfg["algorithm"]
    scorer, distill = node.get("prefix_scorer", {}), node.get("distill", {})
    return "# detox_exp value-guided policy", [
        "- distilled from the guided reference ref(a | s) V(s, a), the tokenwise optimum "
        f"of E[r] - beta KL at beta {_kl_coef_text(ppo, summary)}: {node['steps']} steps, "
        f"batch {node['batch_size']} samples ({identity['samples_per_prompt']} per "
        f"prompt), {distill.get('direction', 'forward')} KL per token on "
        f"{distill.get('prefixes', 'teacher')} prefixes, lr {identity['lr']}",
        f"- prefix scorer V: fitted on {scorer.get('rollout_prompts')} prompts x "
        f"{scorer.get('rollout_samples')} reference samples "
        "(`prefix_scorer.pt`: sample the teacher with detox_exp.guided.teacher)",
    ]


def model_card(
    summary: Mapping[str, Any],
    config: Any,
    eval_table: Sequence[str],
    reward_model: str,
    library: str = "transformers",
) -> str:
    """A trained policy's README: Hugging Face front matter (:func:`card_metadata`), what
    was trained and how (``reward_model``: the classifier PPO used, e.g. the run's own
    trained one), and ``eval_table`` (the evaluation's markdown lines,
    ``evaluation.report.card_table``). ``library``: ``transformers`` for the merged model,
    ``peft`` for the adapter folder."""
    cfg = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
    identity = model_identity(cfg, reward_model)
    name = f"{cfg.get('task_name', 'detox_exp')} {_method_tag(identity)} policy"
    load = (
        "Load with `AutoModelForSeq2SeqLM.from_pretrained(<this folder>)`."
        if library == "transformers"
        else "Load with `PeftModel.from_pretrained(<the base model>, <this folder>)`."
    )
    title, how = _how_trained(cfg, identity, summary)
    lines = [
        card_metadata(identity, summary, library, name),
        title,
        "",
        f"- base model: `{identity['base_model']}`",
        f"- reward model: `{identity['reward_model']}` "
        f"(reward = {identity['reward_type']} of `{cfg['reward']['nontoxic_label']}`)",
        f"- data: `{identity['dataset']}`",
        *how,
        f"- seed: {cfg['seed']}",
        "",
        load,
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
    reward_model: str | None = None,
) -> Path:
    """Write ``adapter/`` (LoRA or full weights), ``value_head.safetensors`` (gae only) and
    ``merged/`` (see :func:`merged_model`), each with its model card (README.md;
    ``reward_model``: the classifier PPO used, by default ``reward.name_or_path``)."""
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
    reward_model = reward_model or cfg["reward"]["name_or_path"]
    card = model_card(summary, cfg, eval_table, reward_model)
    (save_dir / "merged" / "README.md").write_text(card)
    (save_dir / "README.md").write_text(card)
    # peft's save_pretrained writes its placeholder card template there: replace it
    library = "peft" if policy.is_peft else "transformers"  # full fine-tuning: the network
    adapter_card = model_card(summary, cfg, eval_table, reward_model, library=library)
    (save_dir / "adapter" / "README.md").write_text(adapter_card)
    return save_dir
