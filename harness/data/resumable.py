"""A ``DataLoader`` that a Lightning checkpoint can stop and restart mid-epoch, batch for batch.

Lightning saves the ``state_dict`` of every train loader that has one into its checkpoints and
hands it back to ``load_state_dict`` before the loader is iterated on resume (its ``_Stateful``
protocol). The state here is where the current pass over the data began (the sampler's
``torch.Generator`` state when the pass started: the permutation or the with-replacement draws
follow from it) and how many batches of that pass the training loop has consumed. On resume the
generator is set back and that many batches are skipped, so the loader yields the same batches,
in the same order, as if it had never stopped; the passes after it follow as they would have.

*Consumed*, not *yielded*: Lightning's training fetcher prefetches one batch ahead, so at a
checkpoint the loader has yielded one more batch than was trained on. The checkpointing callback
(:class:`harness.resume.ResumeCheckpoint`) therefore tells the loader, before it saves, how many
batches of the pass were trained on (:meth:`ResumableLoader.mark_consumed`).

``torchdata``'s ``StatefulDataLoader`` does the same job but counts yielded batches (one ahead
under Lightning) and does not restore the shuffle of later passes; this class keeps PyTorch's
own ``RandomSampler`` order, so seeds keep the data order they had before resume existed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """A ``DataLoader`` (same arguments) with ``state_dict`` / ``load_state_dict``.

    Without a sampler generator (e.g. the ``DistributedSampler`` Lightning puts in under DDP,
    whose order follows ``set_epoch``) only the skip is restored.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pass_rng: torch.Tensor | None = None   # generator state when the current pass began
        self._consumed = 0                            # batches of the current pass trained on
        self._pending: dict[str, Any] | None = None   # a loaded state, applied at the next pass

    def _generator(self) -> torch.Generator | None:
        sampler = self.sampler if self.batch_sampler is None else self.batch_sampler.sampler
        gen = getattr(sampler, "generator", None)
        return gen if isinstance(gen, torch.Generator) else None

    def mark_consumed(self, n_batches: int) -> None:
        """Record that ``n_batches`` batches of the current pass have been trained on."""
        self._consumed = int(n_batches)

    def state_dict(self) -> dict[str, Any]:
        """``{"rng": generator state to start the pass from (or None), "skip": batches to skip}``.

        A finished pass (every batch consumed) is saved as the start of the next one.
        """
        gen = self._generator()
        if self._pass_rng is not None and self._consumed < len(self):
            return {"rng": self._pass_rng.clone(), "skip": self._consumed}
        return {"rng": gen.get_state() if gen is not None else None, "skip": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next pass where ``state`` (from :meth:`state_dict`) says."""
        if set(state) != {"rng", "skip"} or int(state["skip"]) < 0:
            raise ValueError(f"not a ResumableLoader state: keys {sorted(state)}")
        self._pending = dict(state)

    def __iter__(self) -> Iterator[Any]:
        gen, skip = self._generator(), 0
        if self._pending is not None:
            state, self._pending = self._pending, None
            skip = int(state["skip"])
            if gen is not None and state["rng"] is not None:
                gen.set_state(state["rng"])
        self._pass_rng = gen.get_state() if gen is not None else None
        self._consumed = skip
        return self._batches(super().__iter__(), skip)

    @staticmethod
    def _batches(it: Iterator[Any], skip: int) -> Iterator[Any]:
        for _ in range(skip):  # loaded and dropped: the sampler's draws must happen as before
            next(it, None)
        yield from it
