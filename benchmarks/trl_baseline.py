"""The same PPO benchmark with trl 0.11.4 (the baseline `experiment=bench` is compared to).

Runs in its OWN virtual environment, never the project's (trl is not a dependency):

    python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl==0.11.4 \\
        transformers==4.46.3 peft==0.13.2 'accelerate<1.2' 'datasets<3.2' rich
    /tmp/trl/bin/python benchmarks/trl_baseline.py DIR --steps 10 [--mixed-precision bf16] \
        [--device cuda]

Settings as in conf/experiment/bench.yaml: AutoModelForSeq2SeqLMWithValueHead, LoRA r=32
alpha=32 dropout 0.05 on q,v, reference = adapter disabled, batch 16, mini-batch 4, 1 PPO
epoch, exactly 32 sampled new tokens (top_k=0, top_p=1), reward = "nothate" logit, 2 threads.
Prints one JSON line with the same perf/* keys as the project's summary.json.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "bf16"],
        default="no",
        help="accelerate's mixed precision (bf16 autocast, also on CPU); compare with "
        "precision=bf16",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the policy (through accelerate) and the reward model run; compare with "
        "device=cuda",
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    if cuda:  # trl's phase timers (time.time()) would not wait for queued GPU work
        import trl.trainer.ppo_trainer as trl_ppo

        def synced_time() -> float:
            torch.cuda.synchronize()
            return time.time()

        trl_ppo.time = SimpleNamespace(time=synced_time)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)

    tokenizer = AutoTokenizer.from_pretrained(str(args.dir / "policy"))
    lora = LoraConfig(
        r=32,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q", "v"],
        bias="none",
        task_type="SEQ_2_SEQ_LM",
    )
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(
        str(args.dir / "policy"), peft_config=lora
    )
    config = PPOConfig(
        batch_size=16,
        mini_batch_size=4,
        ppo_epochs=1,
        learning_rate=1.41e-5,
        seed=0,
        accelerator_kwargs={"mixed_precision": args.mixed_precision, "cpu": not cuda},
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    reward_tok = AutoTokenizer.from_pretrained(str(args.dir / "reward"))
    reward_model = (
        AutoModelForSequenceClassification.from_pretrained(str(args.dir / "reward"))
        .eval()
        .to(args.device)
    )
    nothate = reward_model.config.label2id["nothate"]
    prompts = [
        TEMPLATE.format(dialogue=json.loads(line)["dialogue"])
        for line in (args.dir / "prompts.jsonl").read_text().splitlines()
    ]
    gen = {
        "min_new_tokens": 32,
        "max_new_tokens": 32,
        "do_sample": True,
        "top_k": 0,
        "top_p": 1.0,
        "pad_token_id": tokenizer.pad_token_id,
    }
    steps = []
    for _ in range(args.steps):
        start = time.perf_counter()
        batch = random.sample(prompts, 16)
        queries = [tokenizer(p, return_tensors="pt").input_ids[0] for p in batch]
        responses = trainer.generate(queries, batch_size=16, **gen)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        with torch.no_grad():
            enc = reward_tok(
                texts, padding=True, truncation=True, max_length=512, return_tensors="pt"
            ).to(args.device)
            logits = reward_model(**enc).logits[:, nothate].cpu()  # waits for the GPU
        t_score = time.perf_counter()
        stats = trainer.step(queries, list(responses), [r for r in logits])
        end = time.perf_counter()
        steps.append(
            {
                "step_s": end - start,
                "generate_score_s": t_score - start,
                "forward_s": stats["time/ppo/forward_pass"],
                "optimize_s": stats["time/ppo/optimize_step"],
            }
        )
    steady = steps[1:] or steps
    median = statistics.median(s["step_s"] for s in steady)
    print(
        json.dumps(
            {
                "perf/median_step_s": median,
                "perf/samples_per_s": 16 / median,
                "perf/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **(
                    {"perf/peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
                ),
                "perf/median_generate_score_s": statistics.median(
                    s["generate_score_s"] for s in steady
                ),
                "perf/median_forward_s": statistics.median(s["forward_s"] for s in steady),
                "perf/median_optimize_s": statistics.median(s["optimize_s"] for s in steady),
            }
        )
    )


if __name__ == "__main__":
    main()
