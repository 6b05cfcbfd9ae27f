"""How an on-policy update's statistics and normalisers span the batch: over this process's rows
(one process), or over the global batch that the DDP ranks hold in parts.

The methods' equations (:mod:`harness.methods.losses`) take a sum function or a count and know
nothing of processes; :class:`Reduction` is the one place that decides them, injected into every
on-policy module once (:attr:`harness.methods.rl_base.OnPolicyModule.reduction`), so that a run
on W ranks updates as the one-rank run at the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from harness.util.distributed import all_reduce_sum, share_per_rank

__all__ = ["Reduction"]


@dataclass(frozen=True)
class Reduction:
    """``sharded``: the batch is split over DDP ranks (whose gradients DDP averages)."""

    sharded: bool = False

    @property
    def sum_fn(self) -> Callable[[Tensor], Tensor] | None:
        """Sums a rank's partial sums over the ranks (None in one process: the losses' default)."""
        return all_reduce_sum if self.sharded else None

    def share(self, count: Tensor) -> Tensor:
        """A count of the global batch over the world size (``count`` itself in one process):
        dividing a rank's loss sum by it makes DDP's average of the ranks' gradients the gradient
        of the global batch's mean."""
        return share_per_rank(count) if self.sharded else count

    def normaliser(self, loss_type: str, mask: Tensor, rollout_tokens: Tensor | None = None
                   ) -> tuple[str, Tensor | None]:
        """The :func:`~harness.methods.losses.aggregate_loss` mode and ``n_active`` for GRPO's
        ``loss_type`` on one minibatch (``mask`` [B, T] of this process's rows).

        - ``dapo``: ``("dapo", rollout_tokens)``, the valid tokens of the whole rollout batch
          (already :meth:`share`-d by the caller).
        - ``bnpo`` under DDP: ``("dapo", share(mask.sum()))``: each rank divides its token-loss
          sum by the global minibatch's token count over the world size, so DDP's mean of the
          ranks' gradients is the gradient of the global minibatch's token mean; a rank's own
          token mean would weight a rank of short responses like one of long responses.
        - otherwise ``(loss_type, None)``: ``grpo`` (a mean of per-sequence means), ``dr_grpo``
          (``/ (B * max_len)``) and ``bnpo`` in one process are already global.
        """
        if loss_type == "dapo":
            return "dapo", rollout_tokens
        if loss_type == "bnpo" and self.sharded:
            return "dapo", self.share(mask.sum())
        return loss_type, None
