"""Gate telemetry: which experts each task's gate chooses, how sparse it is, when it settles.

Legend: T = tasks, B = examples, N = experts.

State (sums on the training device, updated without host syncs) is kept apart from reduction
across ranks and from naming. compute() returns flat keys:
- gate/<task>/active_experts: experts with nonzero weight, averaged per example;
- gate/<task>/max_active_experts: the most experts with nonzero weight on any one example;
- gate/<task>/experts_used: experts with nonzero weight for at least one example;
- gate/<task>/entropy: entropy of the mixture weights, averaged per example;
- gate/<task>/selected/<e>: fraction of examples giving expert e a nonzero weight;
- gate/<task>/weight/<e>: mean weight of expert e;
- gate/<task>/<stat>: the gate's own per-batch stats averaged over examples (each batch weighted by
  its size, summed over ranks by reduce(); DSelect-k:
  saturated_fraction, selector_entropy, entropy_reg);
- expert/<e>/load: fraction of examples expert e is computed on (union over tasks);
- moe/active_fraction (where measured) and moe/sparse_fraction (batches on the sparse path), and
  the expert-parallel dispatch's ep/... stats: means over batches (of all ranks after reduce()),
  so they depend on how the examples were batched, unlike the per-example keys above;
- with track_selection (static gates: every example gets the same weights),
  gate/<task>/selection_changes: updates at which the task's set of selected experts (nonzero
  weights) differed from the previous update's, counted since the last reset (the paper's
  "how often does the selection change during training").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from recsys_moe.distributed.comm import (
    all_gather_objects,
    all_reduce_,
    all_reduce_int,
    spans_ranks,
)
from recsys_moe.moe.gates.base import GateOutput


class GateTelemetry:
    """Example:
    >>> tel = GateTelemetry(["click", "like"], num_experts=8, device=torch.device("cpu"))
    >>> tel.update(out.gates, out.moe_stats)        # every step
    >>> metrics = tel.compute(); tel.reset()          # on logging steps

    The gates' own statistics (GateOutput.stats: DSelect-k's saturation and selector entropy,
    computed on demand) are the costly part; `update(..., gate_stats=False)` skips them for a
    batch, and compute() averages them over the batches that had them (the trainer takes them
    on the last step of each logging window only: 8% of a default-job step otherwise), and
    `weights=False` skips the weight statistics too (the trainer takes them every
    logger.gate_telemetry_every steps and on logging steps: the training-time figures are then
    over those batches; eval takes every batch).
    """

    def __init__(
        self,
        task_names: Sequence[str],
        num_experts: int,
        device: torch.device,
        track_selection: bool = False,
    ) -> None:
        self.task_names = list(task_names)
        self.num_experts = num_experts
        self.device = device
        self.track_selection = track_selection
        # the previous update's selection [T, N] (first example), kept across resets
        self._last_selection: Optional[torch.Tensor] = None
        self.reset()

    def reset(self) -> None:
        T, N, dev = len(self.task_names), self.num_experts, self.device
        self.selected = torch.zeros(T, N, dtype=torch.float64, device=dev)
        self.weight = torch.zeros(T, N, dtype=torch.float64, device=dev)
        self.active = torch.zeros(T, dtype=torch.float64, device=dev)
        self.max_active = torch.zeros(T, dtype=torch.long, device=dev)
        self.entropy = torch.zeros(T, dtype=torch.float64, device=dev)
        self.used = torch.zeros(T, N, dtype=torch.bool, device=dev)
        self.load = torch.zeros(N, dtype=torch.float64, device=dev)
        self.selection_changes = torch.zeros(T, dtype=torch.float64, device=dev)
        self.stats: list[dict[str, torch.Tensor]] = [{} for _ in range(T)]
        self.moe: dict[str, torch.Tensor] = {}
        self.moe_batches: dict[str, int] = {}
        # updates not yet added to the sums above (_fold): each batch's gate weights, and each
        # MoE stat's values, kept as references (no operator per update)
        self._pending_weights: list[list[torch.Tensor]] = []
        self._pending_moe: dict[str, list[torch.Tensor]] = {}
        self.examples = 0
        self.stats_examples = 0  # the examples of the batches whose gate stats were taken
        self.batches = 0

    def update(
        self,
        gates: Sequence[GateOutput],
        moe_stats: Optional[dict[str, torch.Tensor]] = None,
        gate_stats: bool = True,
        weights: bool = True,
    ) -> None:
        """Adds one batch (all tasks at once: one pass per statistic, not one per task);
        gate_stats=False leaves out the gates' own statistics for this batch, weights=False
        everything else but the selection tracking (which compares consecutive updates) and
        the batch count. Every tensor it keeps is detached (no_grad is not entered: a step
        without weights costs no operator)."""
        self._update_selection(gates)
        self.batches += 1
        if not weights:
            return
        if gates:
            self._pending_weights.append([g.weights.detach() for g in gates])
            if len(self._pending_weights) >= self.MAX_PENDING:
                self._fold()
        if gate_stats and gates:
            rows = gates[0].weights.shape[0]
            self.stats_examples += rows
            with torch.no_grad():  # computed on demand, from the gate's saved tensors
                for t, g in enumerate(gates):
                    for k, v in g.stats.items():  # batch means, weighted by the batch's examples
                        self.stats[t][k] = self.stats[t].get(k, 0.0) + v.detach().double() * rows
        for k, v in (moe_stats or {}).items():
            self._pending_moe.setdefault(k, []).append(v.detach())
            self.moe_batches[k] = self.moe_batches.get(k, 0) + 1

    # Batches whose weights update() keeps before adding them up: the sums then run once over
    # all of them ([T, batches x B, N]) instead of a dozen small operators per batch, each
    # slowed by a cache the training step has just emptied; a bound on the memory they hold.
    MAX_PENDING = 16

    @torch.no_grad()
    def _fold(self) -> None:
        """Adds the pending updates to the sums (before anything reads them)."""
        if self._pending_weights:
            pending, self._pending_weights = self._pending_weights, []
            # [T, sum of B, N], summed in float64: the sums then do not depend on how the
            # examples were batched or folded (as the float64 accumulators across ranks)
            w = torch.cat([torch.stack(ws) for ws in pending], dim=1).double()
            nz = w != 0
            self.selected += nz.sum(1)
            self.weight += w.sum(1)
            self.active += nz.sum((1, 2))
            # per batch as before: the most experts any one example had, over all of them
            self.max_active = torch.maximum(self.max_active, nz.sum(-1).amax(1))
            self.entropy += torch.special.entr(w).sum((1, 2))
            self.used |= nz.any(1)
            any_nonzero = nz.any(0)
            self.load += any_nonzero.sum(0)
            self.examples += any_nonzero.shape[0]
        for k, values in self._pending_moe.items():
            if values:
                total = torch.stack(values).double().sum()
                self.moe[k] = self.moe.get(k, 0.0) + total
        self._pending_moe = {}

    def _update_selection(self, gates: Sequence[GateOutput]) -> None:
        """track_selection: whether each task's selected experts changed since the last batch
        (every batch, so no change is missed)."""
        if not (self.track_selection and gates):
            return
        with torch.no_grad():
            selection = torch.stack([g.weights[0] != 0 for g in gates])  # [T, N]
            if self._last_selection is not None:
                self.selection_changes += (selection != self._last_selection).any(-1)
            self._last_selection = selection

    def reduce(self, group: Optional[dist.ProcessGroup]) -> None:
        """Sums the state of all ranks into every rank (call before compute() at eval)."""
        self._fold()
        if not spans_ranks(group):
            return
        for t in (self.selected, self.weight, self.active, self.entropy, self.load):
            all_reduce_(t, group)
        self.used = all_reduce_(self.used.to(torch.int32), group, dist.ReduceOp.MAX).bool()
        all_reduce_(self.max_active, group, dist.ReduceOp.MAX)
        for stats in self.stats:  # every rank runs the same gates: the same keys
            for k in sorted(stats):
                v = torch.as_tensor(stats[k], dtype=torch.float64, device=self.device)
                stats[k] = all_reduce_(v, group)
        self.examples = all_reduce_int(self.examples, group)
        self.stats_examples = all_reduce_int(self.stats_examples, group)
        # batch-level MoE stats: sums and batch counts of every rank (a rank may have none)
        mine = {k: (float(v), self.moe_batches[k]) for k, v in self.moe.items()}
        merged: dict[str, tuple[float, int]] = {}
        for theirs in all_gather_objects(mine, group):
            for k, (v, n) in theirs.items():
                total, count = merged.get(k, (0.0, 0))
                merged[k] = (total + v, count + n)
        self.moe = {k: torch.tensor(v, dtype=torch.float64) for k, (v, _) in merged.items()}
        self.moe_batches = {k: n for k, (_, n) in merged.items()}

    def mean_weights(self) -> torch.Tensor:
        """[T, N] mean weight of every expert for every task (the heatmap)."""
        self._fold()
        return (self.weight / max(self.examples, 1)).cpu()

    def compute(self) -> dict[str, float]:
        if self.batches == 0:
            return {}
        self._fold()
        n = max(self.examples, 1)
        sel = (self.selected / n).tolist()  # [T][N]: one host copy each, no item() per entry
        wts = (self.weight / n).tolist()
        active = (self.active / n).tolist()
        ent = (self.entropy / n).tolist()
        used = self.used.sum(1).tolist()
        max_active = self.max_active.tolist()
        changes = self.selection_changes.tolist()
        out: dict[str, float] = {}
        for t, name in enumerate(self.task_names):
            p = f"gate/{name}"
            out[f"{p}/active_experts"] = active[t]
            out[f"{p}/max_active_experts"] = float(max_active[t])
            out[f"{p}/experts_used"] = float(used[t])
            out[f"{p}/entropy"] = ent[t]
            if self.track_selection:
                out[f"{p}/selection_changes"] = changes[t]
            for k, v in self.stats[t].items():
                out[f"{p}/{k}"] = float(v) / max(self.stats_examples, 1)
            for e in range(self.num_experts):
                out[f"{p}/selected/{e}"] = sel[t][e]
                out[f"{p}/weight/{e}"] = wts[t][e]
        for e, v in enumerate((self.load / n).tolist()):
            out[f"expert/{e}/load"] = v
        for k, v in self.moe.items():
            # keys with a namespace ("ep/imbalance") keep it; the MoE layer's own get moe/
            key = k if "/" in k else "moe/sparse_fraction" if k == "sparse" else f"moe/{k}"
            out[key] = float(v) / self.moe_batches[k]
        return out


def save_heatmap(
    weights_TN: torch.Tensor, task_names: Sequence[str], path: Path, title: str
) -> Path:
    """A task x expert heatmap of mean gate weights, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, N = weights_TN.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * N + 2.0), max(2.0, 0.45 * T + 1.2)))
    im = ax.imshow(
        weights_TN.numpy(),
        cmap="viridis",
        vmin=0.0,
        vmax=max(1e-9, float(weights_TN.max())),
        aspect="auto",
    )
    ax.set_xticks(range(N), [str(e) for e in range(N)])
    ax.set_yticks(range(T), list(task_names))
    ax.set_xlabel("expert")
    ax.set_title(title)
    if N <= 24 and T * N <= 512:  # numbers in the cells while they stay legible (and cheap)
        for t in range(T):
            for e in range(N):
                v = float(weights_TN[t, e])
                if v >= 0.005:
                    ax.text(
                        e,
                        t,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v < 0.6 * float(weights_TN.max()) else "black",
                    )
    fig.colorbar(im, ax=ax, label="mean weight")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
