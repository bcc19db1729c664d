"""Bad input stops the run before training, naming the config key, file and column."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_moe.data.files import DataError
from recsys_moe.trainer import NonFiniteLossError, Trainer


def _trainer(cfg, tmp_path):
    return Trainer(cfg, tmp_path / "run")


def test_missing_data_path(tiny_train_config, tmp_path):
    tiny_train_config.data.path = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"data\.path \(.*nowhere\) does not exist"):
        _trainer(tiny_train_config, tmp_path)


def test_empty_split(tiny_train_config, tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    tiny_train_config.data.path = str(tmp_path / "data")
    with pytest.raises(DataError, match=r"data\.train \(train\): no Parquet files"):
        _trainer(tiny_train_config, tmp_path)


def _copy_with(tiny_data, tmp_path, mutate):
    """A copy of the tiny data set whose first train file is rewritten by mutate(table)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    first = sorted((data / "train").glob("*.parquet"))[0]
    pq.write_table(mutate(pq.read_table(first)), first)
    return data, first


def test_missing_column_names_file_and_column(tiny_train_config, tiny_data, tmp_path):
    data, first = _copy_with(tiny_data, tmp_path, lambda t: t.drop_columns(["item_tags"]))
    tiny_train_config.data.path = str(data)
    with pytest.raises(DataError) as e:
        _trainer(tiny_train_config, tmp_path)
    assert (
        str(first) in str(e.value) and "'item_tags'" in str(e.value) and "missing" in str(e.value)
    )


def test_wrong_column_type_names_file_and_column(tiny_train_config, tiny_data, tmp_path):
    def to_string(t):
        i = t.schema.get_field_index("user_id")
        return t.set_column(i, "user_id", pa.array([str(v) for v in t["user_id"].to_pylist()]))

    data, first = _copy_with(tiny_data, tmp_path, to_string)
    tiny_train_config.data.path = str(data)
    with pytest.raises(DataError) as e:
        _trainer(tiny_train_config, tmp_path)
    assert str(first) in str(e.value) and "'user_id'" in str(e.value) and "string" in str(e.value)


def test_non_finite_loss_stops_naming_step_and_task(tiny_train_config, tmp_path):
    trainer = _trainer(tiny_train_config, tmp_path)
    inner = trainer.model
    like = trainer.task_names.index("like")

    class PoisonAtStep3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, batch):
            loss, out = self.inner(batch)
            self.calls += 1
            if self.calls == 3:
                out.task_losses = out.task_losses.clone()
                out.task_losses[like] = float("nan")
                loss = loss + out.task_losses[like]
            return loss, out

    trainer.model = PoisonAtStep3()
    try:
        with pytest.raises(NonFiniteLossError, match=r"step 3 \(task: like\)"):
            trainer.train()
    finally:
        trainer.close()


def _plant_eval_label(data, row: int, value: float):
    """Sets click of one row of the first eval file's first row group (400 rows each)."""
    path = sorted((data / "eval").glob("*.parquet"))[0]
    t = pq.read_table(path)
    click = t.column("click").to_pylist()
    click[row] = value
    i = t.schema.get_field_index("click")
    pq.write_table(
        t.set_column(i, "click", pa.array(click, pa.float32())), path, row_group_size=400
    )
    return path


def test_bad_eval_row_stops_the_run_before_training(tiny_train_config, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    path = _plant_eval_label(data, 7, 2.0)
    tiny_train_config.data.path = str(data)
    # Raised while the Trainer is built: no model, no step 1.
    with pytest.raises(DataError) as e:
        _trainer(tiny_train_config, tmp_path)
    assert f"{path}: row group 0: row 7: column 'click'" in str(e.value)
    assert "reason label_not_binary" in str(e.value)
    # Above data.eval_check_max_rows the rows are checked only as they are read.
    tiny_train_config.data.eval_check_max_rows = 999  # the eval split has 1000 rows
    _trainer(tiny_train_config, tmp_path).close()
