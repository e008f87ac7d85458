"""The benchmark against TRL (`make bench`, `python -m rlhf_exp.bench`): the same SFT, RM, DPO and GRPO work
on both sides (workload.py), ours stepped through the stage trainers (ours.py), TRL's trainers (trl_side.py),
each in a process of its own (worker.py), with the work counted in FLOPs against the machine's matmul
peak (flops.py). Results: bench/results/."""
