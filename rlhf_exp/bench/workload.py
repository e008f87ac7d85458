"""The work both sides of the benchmark do: one model folder, the same texts, the same settings.

Texts are TRL's standard dataset types written as JSON lines (prompt / completion, prompt / chosen /
rejected, prompt), read by TRL through `datasets` and by this project through `data=file`. They are
chosen from the vendored data so that every example fits the token budget as it is: neither side
truncates, so both train on the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

STAGES = ("sft", "rm", "dpo", "grpo")


@dataclass
class Workload:
    model: str                  # a local Hugging Face folder (weights + tokenizer)
    files: dict[str, str]       # stage -> JSON lines file
    precision: str              # fp32 | bf16 (autocast, fp32 weights), the machine's fastest
    threads: int
    warmup_steps: int           # steps run before timing starts (allocation, first-call overheads)
    steps: int                  # timed steps
    lr: float = 1e-5
    max_prompt_tokens: int = 192
    max_response_tokens: int = 64
    batch: dict[str, int] = field(default_factory=lambda: {"sft": 8, "rm": 4, "dpo": 4, "grpo": 2})  # seqs / pairs / prompts
    samples_per_prompt: int = 4  # GRPO's group
    max_new_tokens: int = 48
    temperature: float = 0.7
    beta: float = 0.1            # DPO
    kl_coef: float = 0.05        # GRPO's beta
    clip_ratio: float = 0.2
    target_tokens: int = 20      # the length reward's target
    trl_files: dict[str, str] = field(default_factory=dict)  # stage -> the rows we visit, in our order (`ours.in_our_order`)
    peak_matmul_size: int = 2048  # the n of the n^3 matmul the peak is timed on (flops.matmul_peak)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Workload":
        return cls(**json.loads(Path(path).read_text()))


def tokenized_length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def fitting(examples, tokenizer, max_prompt: int, max_response: int, responses, count: int) -> list:
    """The first `count` examples whose prompt and every response (`responses(ex)`) fit their budgets as they
    are (one token is left for the EOS either side appends)."""
    kept = []
    for ex in examples:
        if tokenized_length(tokenizer, ex.prompt) > max_prompt:
            continue
        if any(tokenized_length(tokenizer, r) > max_response - 1 for r in responses(ex)):
            continue
        kept.append(ex)
        if len(kept) == count:
            break
    return kept


def write_data(folder: Path, tokenizer, max_prompt: int, max_response: int, count: int, cache_dir: str) -> dict[str, str]:
    """TL;DR prompt / reference summary (SFT, GRPO's prompts) and HH-RLHF pairs as plain text (RM, DPO)."""
    from rlhf_exp.config import compose_config
    from rlhf_exp.data import load_preference_splits, load_sft_splits

    folder.mkdir(parents=True, exist_ok=True)
    tldr = compose_config(["data=tldr"]).data
    hh = compose_config(["data=hh_rlhf", "data.chat_template=none"]).data
    sft, _ = load_sft_splits(tldr, tokenizer, seed=0, cache_dir=cache_dir)
    pairs, _ = load_preference_splits(hh, tokenizer, seed=0, cache_dir=cache_dir)
    sft = fitting(sft, tokenizer, max_prompt, max_response, lambda ex: [ex.completion], count)
    pairs = fitting(pairs, tokenizer, max_prompt, max_response, lambda ex: [ex.chosen, ex.rejected], count)
    rows = {"sft": [{"prompt": ex.prompt, "completion": ex.completion} for ex in sft],
            "grpo": [{"prompt": ex.prompt} for ex in sft],
            "rm": [{"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected} for ex in pairs]}
    rows["dpo"] = rows["rm"]
    files = {}
    for stage, records in rows.items():
        if len(records) < count:
            raise RuntimeError(f"only {len(records)} {stage} examples fit {max_prompt} + {max_response} tokens")
        path = folder / f"{stage}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files[stage] = str(path)
    return files


def model_folder(quick: bool, cache_dir: str) -> Path:
    """The embedded SmolLM2-135M as a float folder, or (quick) the tiny random model saved as one."""
    from rlhf_exp.config import compose_config
    from rlhf_exp.models.embedded import float_checkpoint

    if not quick:
        model = compose_config(["model=smollm2_135m"]).model
        return float_checkpoint(model, cache_dir)
    folder = Path(cache_dir) / "bench" / "tiny_model"
    if not (folder / "config.json").is_file():
        from rlhf_exp.models import load_causal_lm, load_tokenizer

        cfg = compose_config(["model=tiny"])
        tokenizer = load_tokenizer(cfg.model, cache_dir)
        load_causal_lm(cfg.model, cache_dir, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder
