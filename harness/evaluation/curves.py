"""Held-out gold reward during training: the curve every method shares (DPO and SFT included).

Every ``every`` training steps (and once before the first) the policy decodes a fixed subset of
validation prompts greedily and the task's gold reward scores them. Points go to the run's history
as ``eval/gold_reward``: ``[step, value, trained_tokens, wall_s]``, where ``wall_s`` counts the
stage's time without the curve's own evaluations (their time is ``seconds``, reported apart).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning as L

from harness.evaluation.gold import gold_eval

KEY = "eval/gold_reward"


class HeldOutGoldCurve(L.Callback):
    """Greedy gold reward of ``pl_module.policy`` on ``prompts`` every ``every`` training steps
    (``cuda_graph``: :func:`~harness.evaluation.gold.gold_eval`'s)."""

    def __init__(self, task, tokenizer, prompts: Sequence[str], every: int, max_new_tokens: int,
                 batch_size: int, max_len: int, cuda_graph: bool = False) -> None:
        if every < 1:
            raise ValueError(f"every={every}: must be >= 1")
        self.task, self.tokenizer, self.prompts = task, tokenizer, list(prompts)
        self.every, self.max_new_tokens = every, max_new_tokens
        self.batch_size, self.max_len = batch_size, max_len
        self.cuda_graph = cuda_graph
        self.points: list[list[float]] = []
        self.seconds = 0.0
        self._steps = 0
        self._t0 = 0.0

    def _measure(self, pl_module) -> None:
        t = time.perf_counter()
        policy = pl_module.policy
        was_training = policy.training
        res = gold_eval(policy, self.tokenizer, self.task, self.prompts, self.max_new_tokens,
                        self.batch_size, self.max_len, progress=False,
                        cuda_graph=self.cuda_graph)
        policy.train(was_training)
        self.seconds += time.perf_counter() - t
        wall = time.perf_counter() - self._t0 - self.seconds
        self.points.append([float(self._steps), res.mean_reward,
                            float(getattr(pl_module, "tokens_trained", 0)), wall])

    def state_dict(self) -> dict:  # kept in resume checkpoints
        return {"points": self.points, "steps": self._steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points, self._steps = state_dict["points"], state_dict["steps"]

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        if not self.points:  # a resumed stage has its points up to the checkpoint
            self._measure(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        if self._steps % self.every == 0:
            self._measure(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.points or self.points[-1][0] != self._steps:
            self._measure(pl_module)
