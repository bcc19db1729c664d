"""Entry point: python -m recsys_moe.train [hydra overrides]   (or: recsys-moe-train)

Composes conf/train.yaml against the typed schema (recsys_moe.config), builds the Trainer,
trains, evaluates and writes metrics.jsonl, summary.json and config.yaml to the Hydra run dir.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from recsys_moe.config.store import register, to_typed

# Imported before Hydra sets up logging: FBGEMM logs each library it loads to the root logger at
# import time, which would otherwise flood the console.
from recsys_moe.trainer import Trainer

# torch warns once per process that TorchRec's is_fx_tracing() is ambiguous; nothing to act on.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

register()
log = logging.getLogger("recsys_moe")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger("recsys_moe").setLevel(logging.WARNING)  # rank 0 speaks for the job
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    typed = to_typed(cfg)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer = Trainer(typed, run_dir, config_dict=OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    try:
        trainer.train()
    finally:
        trainer.close()
    log.info("run dir: %s", run_dir)


if __name__ == "__main__":
    main()
