"""`python -m rlhf_exp.launch.fetch_model`: the default model's GGUF fetched and converted to its float copy now
(`make setup`, the Dockerfiles) rather than by the first run; prints where the copy is. rlhf_exp/models/embedded.py
says how."""

from __future__ import annotations

import logging

if __name__ == "__main__":
    from rlhf_exp.config import compose_config
    from rlhf_exp.models.embedded import float_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = compose_config([])
    print(float_checkpoint(cfg.model, cfg.paths.cache_dir))
