"""Shared fixtures (a tiny T5 + tokenizer, stand-in models, the built demo assets) and the
session's settings; the helpers the tests import live in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import detox_exp.cli  # noqa: F401 - registers what composing conf/ needs (register_config)
from tests.helpers.run import CONF_DIR, THREADS


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("WANDB_API_KEY", None)  # tests never talk to a W&B server
    torch.set_num_threads(THREADS)
    # pytest-xdist's --dist loadscope hands out the modules with the most tests first unless
    # told not to: keep the order pytest_collection_modifyitems sets
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The ``slow`` tests first (a stable sort), so that pytest-xdist's workers start on the
    long modules and the short ones fill in behind them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir (``DETOX_EXP_CACHE`` of the runs) with the assets of
    ``experiment=demo_small``, the demo at test size, built once per session and shared by
    the pytest-xdist workers (the first builds them under a file lock, the others wait), or
    reused from DETOX_EXP_TEST_CACHE when set, to save the ~15 s build while iterating."""
    cache = os.environ.get("DETOX_EXP_TEST_CACHE")
    if cache:
        return Path(cache)
    from filelock import FileLock
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "demo_cache"
    with FileLock(f"{shared}.lock"):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(
                "config", overrides=["experiment=demo_small", f"paths.cache_dir={shared}"]
            )
        instantiate(cfg.assets).build()  # no-op once built
    return shared


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny T5 + byte-level BPE tokenizer saved to disk (no SFT)."""
    from detox_exp.demo.assets import random_t5, t5_tokenizer
    from detox_exp.demo.corpus import generate_dialogues

    out = tmp_path_factory.mktemp("tiny_t5")
    dialogues = generate_dialogues(200, seed=0)
    texts = [d["dialogue"] for d in dialogues] + [d["summary"] for d in dialogues]
    tokenizer = t5_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    random_t5(
        len(tokenizer),
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        d_kv=16,
        dropout_rate=0.1,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def standins(tiny_t5: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small local stand-ins: a reward classifier (nothate / hate), one with other labels, a
    decoder-only model, and a prompts.jsonl of demo dialogues."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from detox_exp.demo.assets import random_classifier, roberta_tokenizer
    from detox_exp.demo.corpus import generate_dialogues
    from detox_exp.utils import write_jsonl

    out = tmp_path_factory.mktemp("standins")
    dialogues = generate_dialogues(120, seed=1)
    write_jsonl(out / "prompts.jsonl", dialogues)
    tokenizer = roberta_tokenizer([d["summary"] for d in dialogues], vocab_size=300)
    for name, labels in (
        ("reward", ["nothate", "hate"]),
        ("reward_badlabels", ["LABEL_0", "LABEL_1"]),
    ):
        torch.manual_seed(0)
        random_classifier(
            tokenizer,
            labels,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=130,
        ).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(out / "gpt2")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_t5).save_pretrained(out / "gpt2")
    return {
        "policy": tiny_t5,
        "reward": out / "reward",
        "reward_badlabels": out / "reward_badlabels",
        "gpt2": out / "gpt2",
        "prompts": out / "prompts.jsonl",
        "dir": out,
    }
