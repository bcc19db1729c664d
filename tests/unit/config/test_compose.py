"""Every config composes against the typed schema; typos and wrong types fail naming the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError

from recsys_moe.config.schema import GateType, TaskType, TrainConfig
from recsys_moe.config.store import register, to_typed
from tests.conftest import CONF

register()


def _compose(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_typed(compose("train", overrides=list(overrides)))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_composes_to_typed_config():
    cfg = _compose()
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.gate.type == GateType.dselect_k  # the product's gate is the default
    assert [t.type for t in cfg.data.tasks] == [
        TaskType.binary,
        TaskType.binary,
        TaskType.regression,
        TaskType.regression,
    ]
    assert cfg.data.tasks[3].mask == "rating_observed"
    assert cfg.trainer.epochs == 3


@pytest.mark.parametrize(
    "group, option",
    [
        (g, o)
        for g in ("data", "model", "model/gate", "optim", "trainer", "logger")
        for o in _options(g)
    ],
)
def test_every_group_option_composes(group, option, tmp_path):
    if (group, option) == ("data", "paper_synthetic"):
        # its columns come from the generated data set's dataset.json (from_dataset resolver)
        from recsys_moe.data.paper_synthetic import PaperSyntheticSpec, write

        write(PaperSyntheticSpec(num_tasks=4, num_clusters=2, train_rows=10), tmp_path / "d")
        cfg = _compose(f"{group}={option}", f"data.path={tmp_path / 'd'}")
        assert [t.cluster for t in cfg.data.tasks] == ["c00", "c01", "c00", "c01"]
        return
    _compose(f"{group}={option}")


def test_gate_config_reaches_the_gate():
    """Every model.gate key of the composed DSelect-k config arrives in the built gate."""
    from recsys_moe.moe.gates import DSelectKGate, build_gate

    cfg = _compose(
        "model/gate=dselect_k",
        "model.gate.k=3",
        "model.gate.gamma=0.7",
        "model.gate.per_example=false",
        "model.gate.entropy_reg=0.2",
        "model.gate.entropy_start_step=11",
        "model.gate.entropy_warmup_steps=13",
        "model.gate.entropy_start_fraction=0.3",
        "model.gate.entropy_warmup_fraction=0.2",
    )
    gate = build_gate(cfg.model.gate, cfg.model.num_experts, in_dim=5)
    assert isinstance(gate, DSelectKGate)
    got = (gate.k, gate.gamma, gate.per_example, gate.entropy_reg)
    assert got == (3, 0.7, False, 0.2)
    assert (gate.entropy_start_step, gate.entropy_warmup_steps) == (11, 13)
    assert (gate.entropy_start_fraction, gate.entropy_warmup_fraction) == (0.3, 0.2)
    default = _compose("model/gate=dselect_k").model.gate  # the README's documented default
    assert (default.per_example, default.k, default.gamma, default.entropy_reg) == (
        True,
        2,
        0.5,
        3.0,
    )
    # the schedule follows the run: half of its steps at lambda 0, then a ramp over a tenth
    assert (default.entropy_start_fraction, default.entropy_warmup_fraction) == (0.5, 0.1)
    assert (default.entropy_start_step, default.entropy_warmup_steps) == (None, None)


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match=r"model\.expert_dimm"):
        _compose("model.expert_dimm=3")


def test_forced_unknown_key_fails_naming_it():
    with pytest.raises(ConfigKeyError, match=r"model\.bar"):
        _compose("+model.bar=1")


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose("trainer.max_steps=abc")
    assert "trainer.max_steps" in str(e.value) + str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:
        _compose("data.tasks.0.type=multiclass")
    assert "type" in str(e.value.__cause__)


def test_unknown_group_option_lists_the_available_ones():
    with pytest.raises(MissingConfigException, match="softmax"):
        _compose("model/gate=nope")


def test_switching_gates_on_the_command_line(tmp_path):
    """A gate option sets only its own keys, so any gate can follow any other; a key that an
    experiment set for one gate is an error with another, until it is unset (null)."""
    from recsys_moe.moe.gates import SoftmaxGate, TopKGate, build_gate

    for gate, cls in (("softmax", SoftmaxGate), ("topk", TopKGate)):
        cfg = _compose(f"model/gate={gate}").model.gate
        assert isinstance(build_gate(cfg, 8, in_dim=5), cls)
        assert cfg.gamma is None and cfg.entropy_reg is None  # dselect_k's keys are not set
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "two_of_16.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /model/gate: topk\n"
        "model:\n  num_experts: 16\n  gate:\n    k: 2\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path}]"
    assert _compose(search, "experiment=two_of_16").model.gate.k == 2
    cfg = _compose(search, "experiment=two_of_16", "model/gate=softmax").model.gate
    with pytest.raises(ValueError, match=r"model\.gate\.k \(2\) is not used by the softmax gate"):
        build_gate(cfg, 16, in_dim=5)
    cfg = _compose(search, "experiment=two_of_16", "model/gate=softmax", "model.gate.k=null")
    assert isinstance(build_gate(cfg.model.gate, 16, in_dim=5), SoftmaxGate)
