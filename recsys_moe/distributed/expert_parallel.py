"""Expert parallelism, applied from outside to a model built unsharded.

`parallelize_experts` keeps, in every MultiTaskMoE, only this rank's experts (a contiguous block
of n / ep, global indices [ep_rank * n / ep, ...)) and installs the all-to-all dispatcher over
the ep group. The model was built with the same seed on every rank, so each block starts from
the same values a one-process run gives those experts.

Gradients (the subtle part). Every rank's loss is its share of the global-batch loss
(models/training.py), and the gradient one process would compute is the MEAN over ranks of the
ranks' gradients, which is what DDP gives the dense parameters. An expert's owner accumulates,
through the all-to-all's backward, the gradients of every rank of its ep group; the other ep
groups hold replicas of the same experts (the dp group). So `ExpertGradSync` sums over the dp
group and divides by the world size. DDP must not touch the expert parameters (they differ
between the ranks of a DDP group): their names go to DDP's ignore list.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from recsys_moe.distributed.parallel_dims import ParallelDims
from recsys_moe.moe.dispatch.all_to_all import AllToAllDispatcher
from recsys_moe.moe.layer import MultiTaskMoE


def parallelize_experts(model: nn.Module, dims: ParallelDims) -> list[str]:
    """Shards the experts of every MultiTaskMoE in `model` over dims.ep_group.

    Returns the names (in `model`) of the expert parameters that now live on this rank only;
    empty when ep is 1 (every rank holds every expert and DDP averages them like any other)."""
    if not dims.ep_enabled:
        return []
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, MultiTaskMoE):
            d = AllToAllDispatcher(dims.ep_group, module.experts.num_experts)
            module.use_experts(module.experts.shard(d.first_expert, d.num_local), d)
            names += [
                f"{prefix}.experts.{n}" if prefix else f"experts.{n}"
                for n, _ in module.experts.named_parameters()
            ]
    return names


class ExpertGradSync:
    """After backward, before the optimizer: expert gradients summed over the replicas of this
    rank's experts and divided by the world size (module docstring). One flat all-reduce.

    With `overlap` and replicas (dp > 1), overlapped with the rest of backward, as DDP overlaps
    its buckets: a hook on each expert parameter counts its gradient in, and once all have arrived
    (the experts' backward is done; the dispatch, the gates, the bottom MLP and the tables'
    backward are still to come) the all-reduce starts asynchronously; `__call__` waits for it.
    A step where some expert parameter got no gradient (None) reduces in `__call__` instead:
    every rank still issues exactly one all-reduce of the same size on the dp group per step,
    started early or late, so the ranks' collectives match either way.

    Example:
        >>> sync = ExpertGradSync([p for n, p in model.named_parameters() if n in names], dims)
        >>> loss.backward(); sync(); optimizer.step()
    """

    def __init__(
        self, params: list[nn.Parameter], dims: ParallelDims, overlap: bool = True
    ) -> None:
        self.params = params
        self.dims = dims
        self.overlapped_steps = 0  # steps whose all-reduce started inside backward
        self._arrived = 0
        self._pending: Optional[tuple[Optional[dist.Work], torch.Tensor, list[torch.Tensor]]] = None
        self._hooks = []
        if overlap and params and dims.dp > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._arrive) for p in params]

    def _arrive(self, _param: nn.Parameter) -> None:
        if self._pending is not None:  # its all-reduce read the gradients before this one
            raise RuntimeError(
                "an expert gradient arrived after the experts' gradient all-reduce had started: "
                "two backward passes before one optimizer step (gradient accumulation) are not "
                "supported with expert parallelism over replicas (dp > 1)"
            )
        self._arrived += 1
        if self._arrived == len(self.params):
            grads: list[torch.Tensor] = [p.grad for p in self.params]  # type: ignore[misc]
            self._pending = self._reduce(grads, async_op=True)

    def __call__(self) -> None:
        self._arrived = 0
        if not self.params:
            return
        if self._pending is not None:  # started inside backward
            work, flat, grads = self._pending
            self._pending = None
            self.overlapped_steps += 1
        else:
            grads = []
            for p in self.params:
                if p.grad is None:  # no example reached these experts on any source this step
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            work, flat, grads = self._reduce(grads, async_op=False)
        if work is not None:
            work.wait()
        flat.div_(self.dims.world_size)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def _reduce(
        self, grads: list[torch.Tensor], async_op: bool
    ) -> tuple[Optional[dist.Work], torch.Tensor, list[torch.Tensor]]:
        """The gradients flattened into one buffer and its sum over the dp group started (None:
        no replicas, nothing to sum)."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        work = None
        if self.dims.dp > 1:
            work = dist.all_reduce(flat, group=self.dims.dp_group, async_op=async_op)
        return work, flat, grads

    def close(self) -> None:
        """Removes the hooks (the parameters may outlive this object)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
