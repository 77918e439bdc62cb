"""Build a benchmark DIR: ``policy/`` (random-init T5 + tokenizer), ``reward/`` (random-init
RoBERTa classifier, labels nothate / hate, + tokenizer) and ``prompts.jsonl`` (id, dialogue,
summary, topic), for ``detox-exp experiment=bench`` and the trl 0.11.4 comparison.

    python scripts/make_bench_dir.py --size small --out bench/small   # 13.6M-parameter T5
    python scripts/make_bench_dir.py --size base --out bench/base     # flan-t5-base's shape
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from detox_exp.demo.assets import random_classifier, random_t5, roberta_tokenizer, t5_tokenizer
from detox_exp.demo.corpus import generate_classifier_corpus, generate_dialogues
from detox_exp.utils import write_jsonl

SIZES = {
    # d_model 256, d_ff 1024, 4+4 layers, 4 heads, vocab 8192, gated-gelu. transformers 5
    # always ties T5's lm_head to the embeddings, so this is 11.5M parameters (13.6M untied).
    "small": {
        "t5": dict(
            d_model=256,
            d_ff=1024,
            num_layers=4,
            num_decoder_layers=4,
            num_heads=4,
            d_kv=64,
            vocab_size=8192,
        ),
        "roberta": dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            vocab_size=8192,
        ),
    },
    # google/flan-t5-base and roberta-base shapes (random init)
    "base": {
        "t5": dict(
            d_model=768,
            d_ff=2048,
            num_layers=12,
            num_decoder_layers=12,
            num_heads=12,
            d_kv=64,
            vocab_size=32128,
        ),
        "roberta": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            vocab_size=50265,
        ),
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = SIZES[args.size]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # long, DialogSum-shaped dialogues (~190 prompt tokens with the template)
    # DialogSum-shaped prompts of ~190 tokens: two generated conversations joined into one
    pool = generate_dialogues(args.prompts * 4, seed=args.seed)
    dialogues = []
    for first, second in zip(pool[::2], pool[1::2]):
        text = first["dialogue"] + "\n" + second["dialogue"]
        if 480 <= len(text) <= 640:
            dialogues.append(first | {"id": f"bench_{len(dialogues):05d}", "dialogue": text})
    dialogues = dialogues[: args.prompts]
    write_jsonl(out / "prompts.jsonl", dialogues)
    texts = [d["dialogue"] for d in dialogues] + [d["summary"] for d in dialogues]
    texts += [c["text"] for c in generate_classifier_corpus(4000, seed=args.seed)]

    torch.manual_seed(args.seed)
    tok = t5_tokenizer(texts, vocab_size=min(shape["t5"]["vocab_size"], 8192))
    policy = random_t5(**shape["t5"])
    policy.save_pretrained(out / "policy", safe_serialization=True)
    tok.save_pretrained(out / "policy")

    rtok = roberta_tokenizer(texts, vocab_size=min(shape["roberta"]["vocab_size"], 8192))
    random_classifier(rtok, max_position_embeddings=514, **shape["roberta"]).save_pretrained(
        out / "reward", safe_serialization=True
    )
    rtok.save_pretrained(out / "reward")
    for folder in ("policy", "reward"):  # loadable by older transformers (trl 0.11.4's) too
        path = out / folder / "tokenizer_config.json"
        cfg = json.loads(path.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
        path.write_text(json.dumps(cfg, indent=2))
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"wrote {out}: policy {n_params / 1e6:.1f}M parameters, {len(dialogues)} prompts")


if __name__ == "__main__":
    main()
