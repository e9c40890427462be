"""SPON training: only the bias vectors learn, by KL(p_dense || p_sparse) distillation.

The model is frozen. For each batch the dense teacher's next-token log-probabilities are computed
once without grad (and, with ``teacher_cache``, kept in memory for later epochs); the sparsified
student with biases attached is trained to match them with AdamW. ``train.loss`` ablates the
objective: ``kl`` (default), ``ce`` (next-token cross-entropy on the text, no teacher) or
``kl+logit_l2`` (KL plus ``logit_l2`` x the mean squared centred logit difference). Whatever the
loss, an epoch replaces the kept biases only if its per-block validation KL to the dense model is
lower by more than the paired standard error (:func:`sponlab.method.convergence.replaces`).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sponlab.config import TrainParams
from sponlab.method.convergence import diagnostics, fraction_at_bound, mean_se, replaces
from sponlab.method.distill import TeacherTarget, block_kls, kl_to_teacher, student_kl
from sponlab.method.precision import Bf16Student, uses_autocast
from sponlab.method.sparsify import SparsifySpec, sparsified
from sponlab.method.spon import SponBiases, maybe_attached
from sponlab.method.teachers import TeacherCache, Teachers, teachers_for, validation_targets
from sponlab.model.loading import freeze
from sponlab.model.sites import SiteMap

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def next_token_ce(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of logits [B, T, V] on the blocks' own ids [B, T]."""
    logits = student_logits[:, :-1].float()  # position t predicts token t + 1
    targets = ids[:, 1:].to(logits.device)  # ids live on the embedding's device
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def centred_logit_l2(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the mean over the vocabulary of (d - mean(d))^2, d = z_s - z_t.

    Logits are defined up to a per-token constant, so the difference is centred; centred
    log-prob differences equal centred logit differences, so the cached teacher log-probs serve.
    """
    teacher = teacher_logp.to(student_logits.device).float()  # the LM head's device
    diff = F.log_softmax(student_logits.float(), dim=-1) - teacher  # [B, T, V]
    return (diff - diff.mean(-1, keepdim=True)).pow(2).mean()


def training_loss(
    settings: TrainParams, target: TeacherTarget | None, model: nn.Module, ids: torch.Tensor
) -> torch.Tensor:
    """The objective ``settings.loss`` of the student ``model`` (hooks active) on ``ids`` [B, T]:
    ``kl`` to the dense ``target`` (memory-bounded when it is top-k or ``train.kl_chunk`` is set),
    ``ce`` on the text (``target`` unused) or ``kl+logit_l2``."""
    if settings.loss == "ce":
        return next_token_ce(model(ids).logits, ids)
    if target is None:
        raise ValueError(f"loss {settings.loss!r} needs the dense teacher's targets")
    if settings.loss == "kl":  # the only loss the bounded targets allow (config check)
        return student_kl(model, ids, target, settings.kl_chunk)
    if settings.loss == "kl+logit_l2":
        logits = model(ids).logits  # [B, T, V]
        kl = kl_to_teacher(target.logp, logits)  # first, as before: the same backward order
        return kl + settings.logit_l2 * centred_logit_l2(target.logp, logits)
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
    """Per-step loss rows, per-epoch validation rows, the kept epoch, diagnostics and wall time.

    ``best_epoch`` is the epoch whose biases were kept (0: the initial biases, i.e. no epoch
    improved on them by more than a paired standard error). ``blocks``: the pool indices trained
    on; ``diagnostics``: :func:`sponlab.method.convergence.diagnostics`.
    """

    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    blocks: list[int] = field(default_factory=list)
    tokens: int = 0
    autocast: str | None = None
    diagnostics: dict = field(default_factory=dict)


def validation_kls(
    model: nn.Module,
    site_map: SiteMap,
    spec: SparsifySpec | None,
    biases: SponBiases | None,
    teacher: TeacherCache,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """KL(dense || sparse[+biases]) per block of ``teacher.blocks``, ``[N]`` float32 on the host
    (a few numbers: the epoch statistics are computed there)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(teacher.blocks), batch_size):
            index = torch.arange(start, min(start + batch_size, len(teacher.blocks)))
            target = teacher.get(index, device)  # dense: computed outside the hooks
            with sparsified(model, site_map, spec), maybe_attached(biases, model, site_map):
                kl = block_kls(model, teacher.blocks[index].to(device), target, teacher.chunk)
            out.append(kl.float().cpu())
    return torch.cat(out)


def draw_blocks(pool: int, count: int, seed: int) -> torch.Tensor:
    """The pool indices of the ``count`` training blocks seed ``seed`` trains on (sorted; 0 or
    ``count >= pool``: the whole pool), so seeds differ in their data as well as its order. The
    draw has its own random stream: the batch order of a seed is the same whatever it drew."""
    if count == 0 or count >= pool:
        return torch.arange(pool)
    generator = torch.Generator().manual_seed(1_000_003 + seed)
    return torch.randperm(pool, generator=generator)[:count].sort().values


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

    ``train_blocks`` [P, T] is the training pool: the seed draws ``settings.blocks`` of them
    (:func:`draw_blocks`). The validation KL is measured per block before training (epoch 0) and
    after every epoch; an epoch replaces the kept biases only if it lowers the validation KL by
    more than the paired standard error, so training never returns worse biases than it got.
    ``teachers`` (dense targets of these blocks) may be shared by several calls, e.g. seeds.
    """
    device = next(model.parameters()).device
    freeze(model)  # only the biases learn
    biases.to(device)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    drawn = draw_blocks(len(train_blocks), settings.blocks, settings.seed)
    total_steps = math.ceil(len(drawn) / settings.batch_size) * settings.epochs
    optimizer, scheduler = _optimizer(biases, settings, total_steps)
    if teachers is None:
        val = validation_targets(model, val_blocks, settings)
        teachers = teachers_for(model, train_blocks, len(drawn), val, settings)
    student = Bf16Student(model) if uses_autocast(settings.autocast, model) else None
    result = TrainResult(
        blocks=drawn.tolist(),
        tokens=len(drawn) * train_blocks.shape[1],
        autocast="bfloat16" if student else None,
    )
    initial = [v.detach().clone() for v in biases.vectors]
    per_epoch: list[torch.Tensor] = []  # per-block validation KL [N] of each epoch
    best: list[dict[str, torch.Tensor]] = [{}]
    start = time.perf_counter()

    def validate(epoch: int, train_kl: float) -> None:
        kls = validation_kls(
            model, site_map, spec, biases, teachers.val, settings.batch_size, device
        )
        per_epoch.append(kls)
        val, se = mean_se(kls)
        keep = epoch == 0 or replaces(per_epoch[result.best_epoch], kls)
        if keep:
            result.best_epoch, best[0] = epoch, biases.state()
        result.epochs.append(
            {"epoch": epoch, "step": len(result.steps), "val_kl": val, "val_kl_se": se,
             "train_kl": train_kl, "kept": keep}
        )  # fmt: skip
        log.info("epoch %d: train KL %.5f, val KL %.5f ± %.5f", epoch, train_kl, val, se)

    validate(0, float("nan"))
    bar = tqdm(total=total_steps, desc="train", leave=False)
    for epoch in range(1, settings.epochs + 1):
        order = drawn[torch.randperm(len(drawn), generator=generator)]
        epoch_loss = 0.0
        for batch_start in range(0, len(order), settings.batch_size):
            index = order[batch_start : batch_start + settings.batch_size]
            row = _step(
                model, site_map, spec, biases, train_blocks, index, teachers, settings, student
            )
            _update(biases, optimizer, scheduler, settings, row, epoch, len(result.steps) + 1)
            result.steps.append(row)
            epoch_loss += row["loss"] * len(index)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        validate(epoch, epoch_loss / len(drawn))
    bar.close()
    summed_lr = sum(row["lr"] for row in result.steps)
    at_bound = fraction_at_bound(list(biases.vectors), initial, summed_lr)
    result.diagnostics = diagnostics(per_epoch, summed_lr, at_bound)
    biases.load_state(best[0])
    if result.best_epoch == 0:
        log.warning("no epoch lowered the validation KL beyond its SE: keeping the initial biases")
    else:
        log.info(
            "kept the biases of epoch %d (the last validation KL gain beyond its SE)",
            result.best_epoch,
        )
    log.info("convergence: %s", result.diagnostics["budget_note"])
    result.seconds = time.perf_counter() - start
    return result


def _step(model, site_map, spec, biases, blocks, index, teachers, settings, student) -> dict:
    """Forward and backward of one batch; the row's ``loss`` (gradients left in the biases).

    The teacher runs in the model's dtype; with a :class:`Bf16Student` only the student's matmuls
    run in bfloat16, as on a bf16 GPU (inputs after a bf16 matmul reach the hooks in bf16 and are
    compared with the float32 thresholds; biases, loss and KL stay float32)."""
    device = next(model.parameters()).device
    target = None  # dense targets of the batch, computed with no hooks active
    if settings.loss != "ce":
        target = teachers.train.get(index, device)
    ids = blocks[index].to(device)  # [B, T]
    with (
        sparsified(model, site_map, spec),
        biases.attached(model, site_map),
        student.active() if student else nullcontext(),
    ):
        loss = training_loss(settings, target, model, ids)
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
