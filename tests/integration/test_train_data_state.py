"""The trainer leaves the loader position exactly after the last batch it trained on, so a run
resumed from train_data.state_dict() would see the rows the uninterrupted run sees next."""

from __future__ import annotations

from recsys_moe.data.loader import SplitInput
from recsys_moe.trainer import Trainer


def test_max_steps_leaves_the_loader_after_the_last_trained_batch(tiny_train_config, tmp_path):
    cfg = tiny_train_config
    cfg.data.row_id = "row_id"
    cfg.trainer.max_steps = 5
    trainer = Trainer(cfg, tmp_path)
    try:
        trainer.train()
        state = trainer.train_data.state_dict()
    finally:
        trainer.close()
    assert (state["epoch"], state["batches"]) == (0, 5)

    uninterrupted = [b.row_ids.tolist() for b, _ in SplitInput(cfg.data, "train").batches()]
    resumed = SplitInput(cfg.data, "train")
    resumed.load_state_dict(state)
    assert [b.row_ids.tolist() for b, _ in resumed.batches()] == uninterrupted[5:]
