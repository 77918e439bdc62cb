"""Does a run's merged policy hold its LoRA update? For every LoRA-targeted matrix:
|(merged - base) - B A * scale| / |B A * scale| (base: the checkpoint the run started from),
and the merged model's stored dtype against the base checkpoint's.

    .venv/bin/python scripts/check_merge.py <run dir> [--base <base checkpoint dir>]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--base", type=Path, help="default: the run's model.name_or_path")
    args = parser.parse_args()
    if args.base is None:  # the run's resolved config, as the W&B config stores it
        cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
        args.base = Path(OmegaConf.to_container(cfg.model, resolve=False)["name_or_path"])
    base_dir = args.base
    policy = args.run_dir / "policy"
    adapter = load_file(str(policy / "adapter" / "adapter_model.safetensors"))
    lora = json.loads((policy / "adapter" / "adapter_config.json").read_text())
    scale = lora["lora_alpha"] / lora["r"]
    base = load_file(str(base_dir / "model.safetensors"))
    merged = load_file(str(policy / "merged" / "model.safetensors"))
    worst = 0.0
    for key in sorted(k for k in adapter if "lora_A" in k):
        a, b = adapter[key].double(), adapter[key.replace("lora_A", "lora_B")].double()
        name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        update = b @ a * scale
        change = merged[name].double() - base[name].double()
        rel = ((change - update).norm() / update.norm()).item()
        size = (update.norm() / base[name].double().norm()).item()
        worst = max(worst, rel)
        print(f"{name}: update {size:.2%} of |W|, merged change off by {rel:.3%}")
    dtypes = {t.dtype for t in merged.values()}, {t.dtype for t in base.values()}
    print(f"worst: {worst:.3%}; merged dtype {dtypes[0]}, base checkpoint dtype {dtypes[1]}")


if __name__ == "__main__":
    main()
