"""Everything a resume needs, as flat dicts of tensors for torch.distributed.checkpoint (DCP).

Each part of the training state is a `Part`: `state_dict()` for saving; `load_targets(sizes)`
for the tensors a load fills (sizes: the checkpoint's global shape of each key, for keys whose
size depends on what was saved); `load_state_dict(filled)` to apply them. The checkpointer adds
the part's prefix to its keys:

    model.<name>                 the model (tables: ShardedTensor; experts: global DTensor)
    optim.dense.<name>.<state>   the dense optimizer, per parameter (experts: global DTensor)
    optim.dense.groups           JSON: the parameter groups' hyperparameters
    optim.sparse.<name>.<state>  the fused embedding optimizer (ShardedTensor)
    trainer.*                    the step, the LR schedule, the label means, the W&B run id
    data.train, data.train.shard<v>   JSON: the loader position, and that of each data shard
    rng.rank<r>.cpu|cuda         the RNG state of each rank

Only tensors are saved: non-tensor state is JSON in uint8 tensors, so loading unpickles nothing
(DCP reads tensors with torch.load(weights_only=True)). Experts are saved at their global expert
index ([num_experts, ...], Shard(0) over the ep group, replicated over the dp group) and tables
by their global row offsets, so a checkpoint loads on another number of ranks and another
parallel.ep_size: DCP reads each rank's slice of each tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Protocol

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from recsys_moe.distributed.comm import all_reduce_
from recsys_moe.distributed.parallel_dims import ParallelDims

log = logging.getLogger(__name__)

Sizes = Mapping[str, torch.Size]


class Part(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_targets(self, sizes: Sizes) -> dict[str, Any]: ...

    def load_state_dict(self, filled: dict[str, Any]) -> None: ...


def json_tensor(obj: Any) -> torch.Tensor:
    """`obj` (JSON-serialisable) as a uint8 tensor."""
    return torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8)


def from_json_tensor(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.tolist()).decode())


def json_target(sizes: Sizes, key: str) -> torch.Tensor:
    """An empty uint8 tensor the size of the JSON the checkpoint holds under `key`."""
    if key not in sizes:
        raise KeyError(key)
    return torch.empty(sizes[key], dtype=torch.uint8)


class ExpertLayout:
    """Which parameters are expert-parallel shards, and the (dp, ep) mesh they are sharded on."""

    def __init__(self, dims: ParallelDims, expert_names: Sequence[str]) -> None:
        self.names = set(expert_names)
        self.mesh: Optional[DeviceMesh] = None
        if self.names:
            ranks = torch.tensor(dims.layout()["ep"])  # [dp, ep]
            self.mesh = DeviceMesh.from_group(
                [dims.dp_group, dims.ep_group],
                dims.device.type,
                mesh=ranks,
                mesh_dim_names=("dp", "ep"),
            )

    def wrap(self, name: str, local: torch.Tensor) -> Any:
        """The global view of a rank's expert shard (other tensors as they are)."""
        if name not in self.names or local.dim() == 0:
            return local
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False)

    @staticmethod
    def unwrap(value: Any) -> Any:
        return value.to_local() if isinstance(value, DTensor) else value


class ModelPart:
    """The model's state dict (DMP: sharded tables; experts at their global index)."""

    def __init__(self, model: nn.Module, experts: ExpertLayout) -> None:
        self.model, self.experts = model, experts

    def state_dict(self) -> dict[str, Any]:
        return {k: self.experts.wrap(k, v) for k, v in self.model.state_dict().items()}

    def load_targets(self, sizes: Sizes) -> dict[str, Any]:
        out = {}
        for k, v in self.model.state_dict().items():
            if (
                isinstance(v, torch.Tensor)
                and not isinstance(v, DTensor)
                and k in self.experts.names
            ):
                v = torch.empty_like(v)
            out[k] = self.experts.wrap(k, v)
        missing = [k for k in out if k not in sizes]
        if missing:
            raise KeyError(
                f"the checkpoint has no model entry {missing[0]!r} ({len(missing)} missing): it "
                "was saved from another model (model.* or data.sparse/tasks differ)"
            )
        return out

    def load_state_dict(self, filled: dict[str, Any]) -> None:
        self.model.load_state_dict({k: ExpertLayout.unwrap(v) for k, v in filled.items()})


class DenseOptimizerPart:
    """A torch optimizer's state per named parameter (names survive a re-sharding, indices do
    not), hyperparameters as JSON."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, names: Sequence[str], experts: ExpertLayout
    ) -> None:
        self.optimizer, self.names, self.experts = optimizer, list(names), experts

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        out: dict[str, Any] = {}
        for i, state in sd["state"].items():
            name = self.names[i]
            for k, v in state.items():
                out[f"{name}.{k}"] = (
                    self.experts.wrap(name, v) if isinstance(v, torch.Tensor) else json_tensor(v)
                )
        out["groups"] = json_tensor([_hyper(g) for g in sd["param_groups"]])
        return out

    def load_targets(self, sizes: Sizes) -> dict[str, Any]:
        _materialise(self.optimizer)
        out: dict[str, Any] = {"groups": json_target(sizes, "groups")}
        for i, state in self.optimizer.state_dict()["state"].items():
            name = self.names[i]
            for k, v in state.items():
                key = f"{name}.{k}"
                if not isinstance(v, torch.Tensor):  # saved as JSON: sized by what was saved
                    out[key] = json_target(sizes, key)
                else:
                    out[key] = self.experts.wrap(name, torch.empty_like(v))
        return out

    def load_state_dict(self, filled: dict[str, Any]) -> None:
        sd = self.optimizer.state_dict()
        for i, state in sd["state"].items():
            for k in list(state):
                v = filled[f"{self.names[i]}.{k}"]
                state[k] = (
                    ExpertLayout.unwrap(v)
                    if isinstance(state[k], torch.Tensor)
                    else (from_json_tensor(v))
                )
        for group, saved in zip(sd["param_groups"], from_json_tensor(filled["groups"])):
            group.update(saved)
        self.optimizer.load_state_dict(sd)


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params" and _jsonable(v)}


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _materialise(optimizer: torch.optim.Optimizer) -> None:
    """Creates an optimizer's (lazily made) state so a load has tensors to fill: one step with
    zero gradients and lr 0 (torch's own DCP helper), then the gradients are dropped again."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    _init_optim_state(optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


class FusedOptimizerPart:
    """TorchRec's fused (in-backward) embedding optimizer: its state is sharded like the tables."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        state = self.model.fused_optimizer.state_dict()["state"]
        return {f"{p}.{k}": v for p, d in state.items() for k, v in d.items()}

    def load_targets(self, sizes: Sizes) -> dict[str, Any]:
        return self.state_dict()  # the live sharded tensors: DCP fills them in place

    def load_state_dict(self, filled: dict[str, Any]) -> None:
        sd = self.model.fused_optimizer.state_dict()
        for p, d in sd["state"].items():
            for k in d:
                d[k] = filled[f"{p}.{k}"]
        self.model.fused_optimizer.load_state_dict(sd)


class RngPart:
    """Each rank's RNG state under its own key. On another world size, ranks without a saved
    state keep the seeded one (it drives dropout and Top-k noise only)."""

    def __init__(self, dims: ParallelDims) -> None:
        self.dims = dims

    def _key(self, kind: str) -> str:
        return f"rank{self.dims.rank}.{kind}"

    def state_dict(self) -> dict[str, Any]:
        out = {self._key("cpu"): torch.get_rng_state()}
        if self.dims.device.type == "cuda":
            out[self._key("cuda")] = torch.cuda.get_rng_state(self.dims.device)
        return out

    def load_targets(self, sizes: Sizes) -> dict[str, Any]:
        return {
            k: torch.empty(sizes[k], dtype=torch.uint8) for k in self.state_dict() if k in sizes
        }

    def load_state_dict(self, filled: dict[str, Any]) -> None:
        if not filled:
            log.warning("no RNG state saved for rank %d: it keeps its seeded RNG", self.dims.rank)
        if self._key("cpu") in filled:
            torch.set_rng_state(filled[self._key("cpu")])
        if self._key("cuda") in filled:
            torch.cuda.set_rng_state(filled[self._key("cuda")], self.dims.device)


class LabelMeansPart:
    """The running label means behind rmse_baseline, summed over ranks when saved (loaded onto
    rank 0 alone, so the sum over ranks stays right at any world size)."""

    def __init__(self, means, dims: ParallelDims) -> None:
        self.means, self.dims = means, dims

    def state_dict(self) -> dict[str, Any]:
        both = all_reduce_(torch.stack([self.means.sums, self.means.counts]), self.dims.world_group)
        return {"sums": both[0].cpu(), "counts": both[1].cpu()}

    def load_targets(self, sizes: Sizes) -> dict[str, Any]:
        empty = torch.empty(self.means.sums.shape, dtype=self.means.sums.dtype)
        return {"sums": empty, "counts": empty.clone()}

    def load_state_dict(self, filled: dict[str, Any]) -> None:
        keep = 1.0 if self.dims.is_main else 0.0
        self.means.sums.copy_(filled["sums"].to(self.means.sums) * keep)
        self.means.counts.copy_(filled["counts"].to(self.means.counts) * keep)


class DataPart:
    """The train loader's position: what every rank shares (epoch, batches, the data's
    fingerprint) and the position of each data shard, written by the rank that reads it.

    `position` returns the loader state after the last TRAINED batch (with TorchRec's pipeline
    the loader is ahead by the batches in flight). A checkpoint saved with another
    data.num_shards cannot place its positions on these shards: `on_reshard` says whether that
    is an error or restarts the saved epoch (the rows of that epoch already trained are read
    again: `rows_reread` counts them).
    """

    def __init__(self, data, position, on_reshard: str) -> None:
        self.data, self.position, self.on_reshard = data, position, on_reshard
        self.rows_reread = 0

    def state_dict(self) -> dict[str, Any]:
        state = self.position()
        out = {"train": json_tensor({k: v for k, v in state.items() if k != "shards"})}
        for index, pos in state["shards"].items():
            out[f"train.shard{index}"] = json_tensor(pos)
        return out

    def _saved_shards(self, sizes: Sizes) -> list[int]:
        return sorted(int(k.rsplit("shard", 1)[1]) for k in sizes if k.startswith("train.shard"))

    def load_targets(self, sizes: Sizes) -> dict[str, Any]:
        out = {"train": json_target(sizes, "train")}
        saved = self._saved_shards(sizes)
        if len(saved) == self.data.num_shards:
            for s in self.data.shards:
                out[f"train.shard{s.index}"] = json_target(sizes, f"train.shard{s.index}")
        elif self.on_reshard == "error":
            raise ValueError(
                f"the checkpoint's data position is per data shard, for data.num_shards = "
                f"{len(saved)}; this run reads {self.data.num_shards} shards. Resume with "
                f"data.num_shards={len(saved)} (it must be a multiple of the number of ranks), "
                "or set checkpoint.data_on_reshard=restart_epoch to restart the saved epoch"
            )
        return out

    def load_state_dict(self, filled: dict[str, Any]) -> None:
        common = from_json_tensor(filled["train"])
        shards = {
            int(k.rsplit("shard", 1)[1]): from_json_tensor(v)
            for k, v in filled.items()
            if k.startswith("train.shard")
        }
        if shards:
            self.data.load_state_dict({**common, "shards": shards})
            return
        # data.num_shards changed and the user asked for restart_epoch
        self.rows_reread = int(common["batches"]) * int(common["batch_size"])
        self.data.restart_epoch(int(common["epoch"]))
        log.warning(
            "data.num_shards changed (%d saved, %d now): epoch %d restarts from its beginning; "
            "its %d rows trained before the checkpoint are read again (data/rows_reread)",
            int(common["num_shards"]),
            self.data.num_shards,
            int(common["epoch"]),
            self.rows_reread,
        )
