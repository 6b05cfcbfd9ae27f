"""Every random stream of a run derives from the run's ``seed``.

Streams and where they are drawn:

* ``init``, data order, dropout and noisy-gating noise: the global torch / numpy / Python RNGs,
  reseeded with :func:`seed_stage` at the start of every stage (so a stage's stream does not
  depend on what ran before it in the same process, e.g. earlier jobs of a multirun sweep);
* ``rollout``: the on-policy methods' sampler and minibatch order (a dedicated generator);
* ``rollout_noise``: under a multi-process strategy (``trainer=ddp``), the uniforms of the global
  rollout batch that every rank draws in full and slices (token-level equality across device
  counts: :meth:`harness.methods.rl_base.OnPolicyModule.sampling_noise`);
* ``eval_kl``: the responses sampled to estimate KL(pi || pi_ref) at evaluation;
* ``prompts``: the order in which RL stages draw training prompts;
* ``rm_norm``: the prompts and samples of the SFT policy whose scores normalise a reward model.

Named streams get their own seed, ``stream_seed(seed, name)``, so two streams of one run never
replay the same random numbers.
"""

from __future__ import annotations

import hashlib

import torch

STREAMS = ("stage", "rollout", "rollout_noise", "eval_kl", "prompts", "rm_norm")


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed for stream ``name`` of run seed ``seed``: sha256(f"{seed}/{name}")."""
    if name not in STREAMS:
        raise ValueError(f"unknown random stream {name!r}; known: {', '.join(STREAMS)}")
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` for stream ``name`` of run seed ``seed``."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, name))


def seed_stage(seed: int) -> None:
    """Reseed the global RNGs (torch, CUDA, numpy, random) for a stage of run seed ``seed``."""
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)
