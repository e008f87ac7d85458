"""How much of SmolLM2 a few full fine-tuning steps at lr 1e-5 move when the model is loaded in bf16.

python experiments/bf16_master_weights/measure.py [config overrides ...]

Runs SFT of the embedded SmolLM2-135M loaded with model.dtype=bfloat16 (what the GPU profiles do) for 5
steps at lr 1e-5 (no warm-up), then compares the final checkpoint with the starting weights element by
element. With bf16 master weights, bf16(0.02) + 1e-5 == 0.02: most weights never move. Prints one JSON
line: the fraction of weights that changed, overall and per kind of tensor. Uses only APIs the project
has had since its first stages, so the same script measures any commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from rlhf_exp.launch.run import resolved, run
from rlhf_exp.config import compose_config
from rlhf_exp.models import load_causal_lm, load_tokenizer

SETTINGS = ["model=smollm2_135m", "model.dtype=bfloat16", "hardware=cpu", "hardware.precision=bf16", "stage=sft",
            "stage.lr=1e-5", "stage.warmup_steps=0", "stage.max_steps=5", "stage.batch_size=2",
            "hardware.micro_batch_size.sft=2", "data.max_prompt_tokens=32", "data.max_response_tokens=16",
            "stage.eval_every=null", "stage.eval_examples=2", "stage.num_samples=0", "tracking=none"]


def kind(name: str) -> str:
    if "norm" in name:
        return "norms"
    if "embed" in name:
        return "embeddings"
    return "matrices"


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bf16-master-"))
    cfg = compose_config([*SETTINGS, f"paths.runs_dir={folder}", *sys.argv[1:]])
    plain = resolved(cfg)
    start = load_causal_lm(plain.model, plain.paths.cache_dir, load_tokenizer(plain.model, plain.paths.cache_dir))
    start_state = {k: v.float() for k, v in start.state_dict().items()}
    run(cfg)
    final = next(folder.glob("sft/*/checkpoints/final"))
    end = load_file(str(final / "model.safetensors"))
    moved, total = {}, {}
    for name, after in end.items():
        before = start_state[name]
        group = kind(name)
        moved[group] = moved.get(group, 0) + int((before != after.float()).sum())
        total[group] = total.get(group, 0) + before.numel()
    report = {"overall": sum(moved.values()) / sum(total.values()), "saved_dtype": str(next(iter(end.values())).dtype),
              **{f"{group} ({total[group] / 1e6:.1f}M)": moved[group] / total[group] for group in sorted(total)}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
