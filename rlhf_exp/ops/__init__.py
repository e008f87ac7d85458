"""Hot paths shared by the stages (log-probs now; rollouts live in rlhf_exp.rollout).
Kept small and pure so a profiler finds them and a faster kernel can replace them."""
