"""DPO (Rafailov et al. 2023), as in the seed: a classification loss on preference pairs.

    L_DPO = -log sigma( beta [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)] )

The reference log-probabilities of a pair are computed once, the first time a batch holds it
(:class:`ReferenceLogps`, in the in-order batches of computing them all up front, so the same
numbers), and looked up by example index after that; a run that sees part of the data pays for
that part only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from harness.data.collate import PairCollator, encode_pair
from harness.methods.base import AlignmentModule
from harness.methods.dpo import METHOD, DPOConfig
from harness.methods.losses import dpo_loss, pairwise_accuracy, sequence_logprobs, token_logprobs
from harness.models.llama import CausalLM
from harness.stage import Budget, Fit, Stage, policy_from


def pair_logps(model: CausalLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Summed response log-probs of chosen and rejected [B] each, in one forward over 2B rows.

    batch: ``chosen_input_ids`` / ``chosen_labels`` and ``rejected_*`` [B, T*] (labels -100 on
    prompt and padding). Returns (chosen [B], rejected [B], MoE aux loss).
    """
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    c_lab, r_lab = batch["chosen_labels"], batch["rejected_labels"]
    t = max(c_ids.shape[1], r_ids.shape[1])

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value)

    ids = torch.cat((pad(c_ids, 0), pad(r_ids, 0)))
    labels = torch.cat((pad(c_lab, -100), pad(r_lab, -100)))[:, 1:]
    mask = (labels != -100).float()
    # without autograd (the reference) the LM head skips the columns before the first answer
    # token of the batch; their zero log-probs are put back, so the sums run over the same
    # [2B, T - 1] as with autograd (the logits agree to rounding: response_logprobs)
    start = 0 if torch.is_grad_enabled() else int((labels != -100).any(0).int().argmax())
    out = model(ids, logits_to_keep=t - start)
    lp = token_logprobs(out.logits[:, :-1].float(), labels[:, start:], mask[:, start:])
    if start:
        lp = torch.nn.functional.pad(lp, (start, 0))
    seq = sequence_logprobs(lp, mask)
    b = c_ids.shape[0]
    return seq[:b], seq[b:], out.aux_loss


@torch.no_grad()
def pair_logps_table(model: CausalLM, tokenizer, prompts: Sequence[str], chosen: Sequence[str],
                     rejected: Sequence[str], batch_size: int, max_len: int) -> torch.Tensor:
    """Summed response log-probs [N, 2] (chosen, rejected) of ``N`` pairs, in batches.

    Pairs longer than ``max_len`` are truncated as in training (``encode_pair``).
    """
    model.eval()
    rows = []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        enc = encode_pair(tokenizer, p, c, r, max_len, overflow="truncate")
        if enc is None:
            raise ValueError(f"preference pair {i} cannot be encoded within max_len={max_len}")
        rows.append({**enc, "index": i})
    collate = PairCollator(pad_id=tokenizer.pad_token_id)
    device = model.device
    out = torch.empty(len(rows), 2)
    for start in tqdm(range(0, len(rows), batch_size), desc="pair log-probs", leave=False):
        batch = collate(rows[start:start + batch_size])
        c, r, _ = pair_logps(model, {k: v.to(device) for k, v in batch.items()})
        out[batch["index"], 0] = c.float().cpu()
        out[batch["index"], 1] = r.float().cpu()
    return out


def prefers_chosen(logps: torch.Tensor) -> list[float]:
    """Per pair 1.0 when the chosen response has strictly more log-likelihood, else 0.0.

    logps: [N, 2] (chosen, rejected) summed log-probs.
    """
    return (logps[:, 0] > logps[:, 1]).float().tolist()


@dataclass
class SharedPromptPairs:
    """A batch of pairs packed one row per pair, ``[bos + prompt, chosen, rejected, pad]``
    (:func:`pack_shared_prompt`).

    ids, positions: [B, L]; mask: [B, 1, L, L] boolean, True = may attend (causal, except that
    no rejected token sees a chosen one); ``<side>_at`` [B, N_side]: the packed position whose
    hidden state predicts each response token, ``<side>_tokens`` [B, N_side] those tokens,
    ``<side>_mask`` [B, N_side] 1.0 on real ones (the side's EOS included); ``first_at``: the
    earliest predicting position (the shortest prompt's last), where the LM head can start.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    chosen_at: torch.Tensor
    chosen_tokens: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_at: torch.Tensor
    rejected_tokens: torch.Tensor
    rejected_mask: torch.Tensor
    first_at: int


def pack_shared_prompt(batch: dict[str, torch.Tensor]) -> SharedPromptPairs:
    """One row per pair with the prompt once: ``[bos + prompt (P), chosen (C), rejected (R)]``.

    batch: :class:`~harness.data.collate.PairCollator`'s (right-padded sides whose first
    ``prompt_len`` = P tokens are the same ``bos + prompt``). Positions run 0..P+C-1 over prompt
    and chosen and restart at P for the rejected tokens, which attend to the prompt and to each
    other only, so every response token sees exactly what it sees in its own sequence
    ``[bos + prompt, response]``. The first token of each side is predicted from the prompt's last
    position P - 1; a later token from the position before it. Row length P + C + R, padded with
    id 0 to the batch's longest.
    """
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    p = batch["prompt_len"].to(c_ids.device)[:, None]                        # [B, 1]
    c_end = batch["chosen_attention_mask"].sum(1, keepdim=True)              # P + C
    r_len = batch["rejected_attention_mask"].sum(1, keepdim=True) - p        # R
    end = c_end + r_len
    # the widths and the shortest prompt in one host sync (this runs in every training step)
    width, c_width, r_width, p_min = torch.stack(
        (end.max(), (c_end - p).max(), r_len.max(), p.min())).tolist()
    t = torch.arange(width, device=c_ids.device)[None, :]                    # [1, L]
    in_rejected = (t >= c_end) & (t < end)
    src_c = t.clamp(max=c_ids.shape[1] - 1).expand(c_ids.shape[0], -1)
    src_r = (t - c_end + p).clamp(0, r_ids.shape[1] - 1)
    ids = torch.where(t < c_end, c_ids.gather(1, src_c), 0)
    ids = torch.where(in_rejected, r_ids.gather(1, src_r), ids)
    positions = torch.where(in_rejected, t - c_end + p, torch.where(t < c_end, t, 0))
    chosen_key = (t >= p) & (t < c_end)
    causal = t[:, :, None] >= t[:, None, :]                                  # [1, L, L]
    mask = causal & ~(in_rejected[:, :, None] & chosen_key[:, None, :])

    def side(n: torch.Tensor, width_side: int, source: torch.Tensor, later_from: torch.Tensor):
        """Predicting positions, tokens and mask of one side's n [B, 1] response tokens (at most
        ``width_side``), token j >= 1 predicted from ``later_from + j - 1``."""
        j = torch.arange(width_side, device=c_ids.device)[None, :]
        real = j < n
        at = torch.where(j == 0, p - 1, later_from + j - 1)
        tokens = source.gather(1, (p + j).clamp(max=source.shape[1] - 1))
        return (torch.where(real, at, 0), torch.where(real, tokens, 0), real.float())

    c_at, c_tok, c_mask = side(c_end - p, c_width, c_ids, p)
    r_at, r_tok, r_mask = side(r_len, r_width, r_ids, c_end)
    return SharedPromptPairs(ids, positions, mask[:, None], c_at, c_tok, c_mask, r_at, r_tok,
                             r_mask, p_min - 1)


def shared_prompt_pair_logps(model: CausalLM, batch: dict[str, torch.Tensor]
                             ) -> tuple[torch.Tensor, ...]:
    """:func:`pair_logps` with the prompt run once per pair (:func:`pack_shared_prompt`).

    The same sums (chosen [B], rejected [B]) to rounding, over B rows of P + C + R tokens instead
    of 2B rows of max(P + C, P + R): fewer FLOPs by about P / (2P + C + R) of them. The LM head
    runs from the batch's shortest prompt's last position on (``logits_to_keep``). An MoE
    model's auxiliary loss and expert load are taken over the packed tokens (each prompt token
    once, not twice). ``model``: the harness's decoder (or a view of it that passes ``forward``'s
    arguments on, such as the LoRA reference). Returns (chosen, rejected, aux).
    """
    packed = pack_shared_prompt(batch)
    start = packed.first_at
    out = model(packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                logits_to_keep=packed.ids.shape[1] - start)
    logits = out.logits.float()

    def side_logps(at: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        picked = logits.gather(1, (at - start).clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1]))
        return sequence_logprobs(token_logprobs(picked, tokens, mask), mask)

    return (side_logps(packed.chosen_at, packed.chosen_tokens, packed.chosen_mask),
            side_logps(packed.rejected_at, packed.rejected_tokens, packed.rejected_mask),
            out.aux_loss)


class ReferenceLogps:
    """Reference log-probs [n, 2] (chosen, rejected) of a split's pairs by ``index``, each computed
    once, when a batch first needs it.

    Rows are computed a whole in-order batch at a time -- batch ``k`` holds pairs
    ``k·B .. (k+1)·B - 1``, exactly the batches of ``reference_dataloader`` -- so every value equals
    the one computing the whole table up front would give, while a run whose budget covers a part
    of the data (a real model, a few steps) pays for that part only. The reference runs in eval
    mode under ``no_grad`` on the device of the batch that asks; it is held outside the module
    tree (not a trained or saved network).
    """

    def __init__(self, reference: torch.nn.Module, dataset, collate, batch_size: int,
                 logps=None) -> None:
        """``logps``: how a batch is scored (:func:`pair_logps`, the default, or
        :func:`shared_prompt_pair_logps`; the policy's own, so that they agree at step 0)."""
        self._reference = (reference,)
        self.logps = logps or pair_logps
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.table = torch.full((len(dataset), 2), float("nan"))

    @property
    def computed(self) -> int:
        """How many pairs have their reference log-probs so far."""
        return int((~torch.isnan(self.table[:, 0])).sum())

    @torch.no_grad()
    def _compute_batch(self, k: int, device: torch.device) -> None:
        rows = range(k * self.batch_size, min(len(self.dataset), (k + 1) * self.batch_size))
        batch = self.collate([self.dataset[i] for i in rows])
        batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
        reference = self._reference[0]
        was = reference.training
        reference.to(device).eval()
        try:
            c, r, _ = self.logps(reference, batch)
        finally:
            reference.train(was)
        self.table[batch["index"].cpu(), 0] = c.float().cpu()
        self.table[batch["index"].cpu(), 1] = r.float().cpu()

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """The rows of ``index`` [B] -> [B, 2] on ``index``'s device, computing missing ones."""
        idx = index.cpu()
        missing = idx[torch.isnan(self.table[idx, 0])]
        for k in sorted({int(i) // self.batch_size for i in missing}):
            self._compute_batch(k, index.device)
        if torch.isnan(self.table[idx]).any():
            raise RuntimeError("DPO reference log-probs: some pairs were not scored")
        return self.table[idx].to(index.device)

    def fill(self) -> torch.Tensor:
        """Every row (the whole table [n, 2]), computed where missing."""
        for k in range((len(self.dataset) + self.batch_size - 1) // self.batch_size):
            if torch.isnan(self.table[k * self.batch_size:(k + 1) * self.batch_size]).any():
                self._compute_batch(k, torch.device("cpu"))
        return self.table


def reference_logps(reference: torch.nn.Module, datamodule, split: str = "train") -> torch.Tensor:
    """Reference log-probs of every pair of ``split`` [n, 2] (chosen, rejected), by ``index``."""
    return ReferenceLogps(reference, datamodule.datasets[split], datamodule.collate,
                          datamodule.batch_size).fill()


class DPOModule(AlignmentModule):
    """Thin Lightning shell around :func:`harness.methods.losses.dpo_loss`."""

    def __init__(self, policy: CausalLM, ref: ReferenceLogps, cfg: DPOConfig,
                 val_ref: ReferenceLogps | None = None) -> None:
        """ref / val_ref: the reference log-probs of the train / validation pairs."""
        super().__init__(cfg.optim, cfg.max_steps)
        self.policy = policy
        self.ref, self.val_ref = ref, val_ref
        self.cfg = cfg

    def trainable_modules(self):
        return [self.policy]

    def _losses(self, batch, table: ReferenceLogps | None = None):
        with self.region("reference"):  # scored when a pair is first needed, then looked up
            ref = (self.ref if table is None else table).lookup(batch["index"])
        logps = shared_prompt_pair_logps if self.cfg.share_prompt else pair_logps
        pc, pr, aux = logps(self.policy, batch)
        losses, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], self.cfg.beta,
                                  self.cfg.label_smoothing, self.cfg.loss_type)
        return losses.mean(), rc, rr, aux

    def training_step(self, batch, batch_idx):
        loss, rc, rr, aux = self._losses(batch)
        total = self.checked("train/loss", loss + aux)
        b = rc.shape[0]
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=False, batch_size=b)
        self.log_dict({"train/rewards_chosen": rc.mean(), "train/rewards_rejected": rr.mean(),
                       "train/rewards_acc": pairwise_accuracy(rc, rr),
                       "train/rewards_margin": (rc - rr).mean()},
                      on_step=True, on_epoch=False, batch_size=b)
        if aux.requires_grad:
            self.log("train/moe_aux_loss", aux.detach(), on_step=True, on_epoch=False, batch_size=b)
        self.log_throughput(int(batch["chosen_attention_mask"].sum()
                                + batch["rejected_attention_mask"].sum()))
        self.pairs_seen += b
        return total

    def validation_step(self, batch, batch_idx):
        if self.val_ref is None:
            return
        loss, rc, rr, _ = self._losses(batch, self.val_ref)
        b = rc.shape[0]
        self.log_dict({"val/loss": loss, "val/rewards_acc": pairwise_accuracy(rc, rr)},
                      on_step=False, on_epoch=True, batch_size=b)


class DPOStage(Stage, method=METHOD):
    """DPO from the SFT base: each pair's reference log-probabilities computed once, when needed."""

    data = "pairs"

    def build(self, ctx, cfg: DPOConfig, inputs) -> Fit:
        dm = ctx.datamodule("pairs", cfg)
        dm.setup("fit")
        policy, reference = policy_from(inputs, ctx.model_cfg.lora)
        logps = shared_prompt_pair_logps if cfg.share_prompt else pair_logps  # Stage.check_model
        ref, val_ref = (ReferenceLogps(reference, dm.datasets[split], dm.collate, dm.batch_size,
                                       logps)
                        for split in ("train", "validation"))
        return Fit(DPOModule(policy, ref, cfg, val_ref), dm,
                   Budget(max_steps=cfg.max_steps, grad_clip=cfg.optim.grad_clip,
                          val_every=cfg.val_every),
                   model=policy, networks={"policy": policy, "reference": reference},
                   trainable=[policy])
