"""SPON training: only the bias vectors learn, by KL(p_dense || p_sparse) distillation.

The model is frozen. For each batch the dense teacher's next-token log-probabilities are computed
once without grad (and, with ``teacher_cache``, kept in memory for later epochs); the sparsified
student with biases attached is trained to match them with AdamW. ``train.loss`` ablates the
objective: ``kl`` (default), ``ce`` (next-token cross-entropy on the text, no teacher) or
``kl+logit_l2`` (KL plus ``logit_l2`` x the mean squared centred logit difference). Whatever the
loss, the kept epoch is the one with the lowest validation KL to the dense model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sponlab.config import TrainParams
from sponlab.distill import TeacherTarget, chunked_kl, dense_target
from sponlab.models import freeze
from sponlab.sites import SiteMap
from sponlab.sparsify import SparsifySpec, sparsified
from sponlab.spon import SponBiases, maybe_attached

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def kl_to_teacher(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), computed in fp32.

    teacher_logp: [B, T, V] log-probabilities; student_logits: [B, T, V] raw logits.
    """
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    per_token = F.kl_div(student_logp, teacher_logp.float(), log_target=True, reduction="none")
    return per_token.sum(-1).mean()


def next_token_ce(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of logits [B, T, V] on the blocks' own ids [B, T]."""
    logits = student_logits[:, :-1].float()  # position t predicts token t + 1
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def centred_logit_l2(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the mean over the vocabulary of (d - mean(d))^2, d = z_s - z_t.

    Logits are defined up to a per-token constant, so the difference is centred; centred
    log-prob differences equal centred logit differences, so the cached teacher log-probs serve.
    """
    diff = F.log_softmax(student_logits.float(), dim=-1) - teacher_logp.float()  # [B, T, V]
    return (diff - diff.mean(-1, keepdim=True)).pow(2).mean()


def training_loss(
    settings: TrainParams,
    teacher_logp: torch.Tensor | None,
    student_logits: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """The objective ``settings.loss`` of one batch (``teacher_logp`` unused by ``ce``)."""
    if settings.loss == "ce":
        return next_token_ce(student_logits, ids)
    if teacher_logp is None:
        raise ValueError(f"loss {settings.loss!r} needs the dense teacher's log-probs")
    kl = kl_to_teacher(teacher_logp, student_logits)
    if settings.loss == "kl":
        return kl
    if settings.loss == "kl+logit_l2":
        return kl + settings.logit_l2 * centred_logit_l2(teacher_logp, student_logits)
    raise ValueError(f"unknown loss {settings.loss!r}")


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base learning rate at each optimizer step."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


@dataclass
class TrainResult:
    """Per-step loss rows, per-epoch validation rows, the kept epoch and wall time.

    ``best_epoch`` is the epoch whose biases were kept (lowest validation KL; 0: the initial
    biases, i.e. no epoch of training improved on them).
    """

    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


class TeacherCache:
    """Dense targets per block index, computed on first use (kept when ``keep``): full log-probs,
    or with ``topk`` the top-k and the rest (:mod:`sponlab.distill`), ``chunk`` tokens at a time.
    Kept targets live in host memory (a cache, not work), each batch is moved to the device."""

    def __init__(
        self, model: nn.Module, blocks: torch.Tensor, keep: bool, topk: int = 0, chunk: int = 0
    ) -> None:
        self.model, self.blocks, self.keep = model, blocks, keep
        self.topk, self.chunk = topk, chunk
        self.cache: dict[int, TeacherTarget] = {}

    def get(self, index: torch.Tensor, device: torch.device) -> TeacherTarget:
        missing = [int(i) for i in index if int(i) not in self.cache]
        if missing:
            ids = self.blocks[missing].to(device)
            target = dense_target(self.model, ids, self.topk, self.chunk)
            if not self.keep:
                order = {j: k for k, j in enumerate(missing)}
                return target.map(lambda t: t[[order[int(i)] for i in index]])
            for k, j in enumerate(missing):
                self.cache[j] = target.map(lambda t, k=k: t[k].cpu())
        rows = TeacherTarget.stack([self.cache[int(i)] for i in index])
        return rows.map(lambda t: t.to(device))


def student_kl(
    model: nn.Module, ids: torch.Tensor, target: TeacherTarget, chunk: int
) -> torch.Tensor:
    """Mean KL(teacher || student) on ``ids`` [B, T] (hooks active): one forward and full
    log-probs, or the memory-bounded path when the target is top-k or ``chunk`` is set."""
    if target.is_full and chunk == 0:
        return kl_to_teacher(target.logp, model(ids).logits)
    return chunked_kl(model, ids, target, chunk)


def validation_kl(
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec | None,
    biases: SponBiases | None,
    teacher: TeacherCache,
    batch_size: int,
    device: torch.device,
) -> float:
    """Token-weighted mean KL(dense || sparse[+biases]) over all of ``teacher.blocks``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(teacher.blocks), batch_size):
            index = torch.arange(start, min(start + batch_size, len(teacher.blocks)))
            target = teacher.get(index, device)  # dense: computed outside the hooks
            with sparsified(model, site_map, spec), maybe_attached(biases, model, site_map):
                kl = student_kl(model, teacher.blocks[index].to(device), target, teacher.chunk)
            total += float(kl) * len(index)
            count += len(index)
    return total / max(count, 1)


@dataclass
class Teachers:
    """Dense targets of the train and validation blocks, shareable by several trainings."""

    train: TeacherCache
    val: TeacherCache

    @classmethod
    def for_blocks(
        cls,
        model: nn.Module,
        train_blocks: torch.Tensor,
        val_blocks: torch.Tensor,
        keep: bool,
        topk: int = 0,
        chunk: int = 0,
    ) -> Teachers:
        """Train targets kept when ``keep``; validation targets always kept (reused each epoch)."""
        return cls(
            TeacherCache(model, train_blocks, keep, topk, chunk),
            TeacherCache(model, val_blocks, True, topk, chunk),
        )


def _optimizer(biases: SponBiases, settings: TrainParams, total_steps: int):
    optimizer = torch.optim.AdamW(
        biases.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(settings.schedule, settings.warmup_steps, total_steps)
    )
    return optimizer, scheduler


def train_spon(
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec,
    biases: SponBiases,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    settings: TrainParams,
    teachers: Teachers | None = None,
) -> TrainResult:
    """Train ``biases`` in place from their current values; keep the best validation epoch.

    The validation KL is measured before training (epoch 0) and after every epoch; the biases of
    the lowest one are restored at the end, so training never returns worse biases than it got.
    ``teachers`` (dense targets of these blocks) may be shared by several calls, e.g. seeds.
    """
    device = next(model.parameters()).device
    freeze(model)  # only the biases learn
    biases.to(device)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    total_steps = math.ceil(len(train_blocks) / settings.batch_size) * settings.epochs
    optimizer, scheduler = _optimizer(biases, settings, total_steps)
    teachers = teachers or Teachers.for_blocks(
        model,
        train_blocks,
        val_blocks,
        settings.teacher_cache,
        settings.teacher_topk,
        settings.kl_chunk,
    )
    result = TrainResult()
    start = time.perf_counter()

    def validate(epoch: int, train_kl: float) -> None:
        val = validation_kl(
            model, site_map, spec, biases, teachers.val, settings.batch_size, device
        )
        result.epochs.append(
            {"epoch": epoch, "step": len(result.steps), "val_kl": val, "train_kl": train_kl}
        )
        if epoch == 0 or val < result.epochs[result.best_epoch]["val_kl"]:
            result.best_epoch, best[0] = epoch, biases.state()
        log.info("epoch %d: train KL %.5f, val KL %.5f", epoch, train_kl, val)

    best: list[dict[str, torch.Tensor]] = [{}]
    validate(0, float("nan"))
    bar = tqdm(total=total_steps, desc="train", leave=False)
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(len(train_blocks), generator=generator)
        epoch_loss = 0.0
        for batch_start in range(0, len(order), settings.batch_size):
            index = order[batch_start : batch_start + settings.batch_size]
            row = _step(model, site_map, spec, biases, train_blocks, index, teachers, settings)
            _update(biases, optimizer, scheduler, settings, row, epoch, len(result.steps) + 1)
            result.steps.append(row)
            epoch_loss += row["loss"] * len(index)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        validate(epoch, epoch_loss / len(train_blocks))
    bar.close()
    biases.load_state(best[0])
    if result.best_epoch == 0:
        log.warning("no epoch lowered the validation KL: keeping the initial biases")
    else:
        log.info("kept the biases of epoch %d (lowest validation KL)", result.best_epoch)
    result.seconds = time.perf_counter() - start
    return result


def _step(model, site_map, spec, biases, blocks, index, teachers, settings) -> dict:
    """Forward and backward of one batch; the row's ``loss`` (gradients left in the biases)."""
    device = next(model.parameters()).device
    target = None  # dense targets of the batch, computed with no hooks active
    if settings.loss != "ce":
        target = teachers.train.get(index, device)
    ids = blocks[index].to(device)  # [B, T]
    with sparsified(model, site_map, spec), biases.attached(model, site_map):
        if settings.loss == "kl":  # the only loss the bounded targets allow (config check)
            loss = student_kl(model, ids, target, settings.kl_chunk)
        else:
            logp = None if target is None else target.logp
            loss = training_loss(settings, logp, model(ids).logits, ids)
    loss.backward()
    return {"loss": loss.item()}


def _update(biases, optimizer, scheduler, settings: TrainParams, row, epoch, step) -> None:
    """Clip, step the optimizer and the schedule; complete ``row`` (raises on divergence)."""
    if not math.isfinite(row["loss"]):
        raise TrainingDivergedError(
            f"non-finite loss {row['loss']} at step {step} (epoch {epoch}); "
            f"lower train.lr (now {settings.lr}) or check the thresholds"
        )
    clip = settings.grad_clip if settings.grad_clip > 0 else float("inf")
    grad_norm = nn.utils.clip_grad_norm_(biases.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    row.update(
        {
            "step": step,
            "epoch": epoch,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
        }
    )
    scheduler.step()
