"""Downstream tasks (lm-evaluation-harness) on any pipeline cell: dense, TEAL-only or TEAL+SPON.

Optional: needs the ``lmeval`` extra (``pip install -e '.[lmeval]'``; the locked dev environment
has it). The loaded model instance is wrapped by lm-eval's ``HFLM`` and the cell's sparsification
and biases are attached with the same hooks the pipeline evaluates with (:func:`sparsified`,
:meth:`SponBiases.attached`), so a task accuracy and the pipeline's perplexity describe one network.

Hub tasks (``hellaswag``, ``arc_easy``, ``piqa``, ``winogrande``, ... as in the TEAL and SPON papers)
download their data; :func:`local_task` turns a JSONL file of multiple-choice questions into a task
that runs offline (the bundled ``demo`` task, and the tests).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from sponlab.io.data import wants_bos
from sponlab.io.layout import BASE, LMEVAL, SPON, THRESHOLDS, cell_path, seed_path
from sponlab.method.sparsify import SparsifySpec, sparsified
from sponlab.method.spon import SponBiases, maybe_attached
from sponlab.model.sites import SiteMap

log = logging.getLogger(__name__)

VARIANTS = ("dense", "teal", "spon")
DEMO_TASK = Path(__file__).parents[1] / "resources" / "lmeval_demo.jsonl"


@dataclass(frozen=True)
class TaskScores:
    """Per task, lm-eval's numeric results (``acc,none`` -> ``acc``) and its sample count."""

    scores: dict[str, dict[str, float]]
    samples: dict[str, int]
    loglikelihoods: dict[str, list[list[float]]]  # per task, per document: one per choice


def require_lm_eval() -> Any:
    """Import lm_eval or say how to install it (it is an optional extra)."""
    try:
        import lm_eval
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lm-eval is not installed: pip install -e '.[lmeval]' (or lm-eval>=0.4.4)"
        ) from err
    return lm_eval


def local_task(jsonl: Path, name: str | None = None) -> dict[str, Any]:
    """An lm-eval multiple-choice task config for a local JSONL file (runs offline).

    Each line: ``{"context": str, "choices": [str, ...], "answer": int}``; a choice is scored by
    the log-likelihood of its text after the context (so choices usually start with a space).
    """
    jsonl = Path(jsonl).resolve()
    first = json.loads(jsonl.read_text().splitlines()[0])
    missing = {"context", "choices", "answer"} - set(first)
    if missing:
        raise ValueError(f"{jsonl}: lines need context, choices, answer; missing {sorted(missing)}")
    return {
        "task": name or f"local_{jsonl.stem}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def bos_for_lm_eval(tokenizer: Any, policy: str | bool) -> bool:
    """lm-eval's ``add_bos_token`` that matches the pipeline's ``data.bos`` on this tokenizer.

    lm-eval only forwards it as ``add_special_tokens``, so it can add a BOS only where the
    tokenizer's own template has one (Llama 3: yes; SmolLM2, GPT-2: no). When the pipeline
    prepends BOS to a tokenizer whose template lacks it, lm-eval cannot follow: say so."""
    bos = wants_bos(tokenizer, policy)
    if bos and not wants_bos(tokenizer, "auto"):
        log.warning(
            "data.bos: %s prepends BOS, but this tokenizer adds none itself and lm-eval cannot "
            "insert one: its task scores are without BOS while the pipeline's perplexities have "
            "it",
            policy,
        )
    return bos


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    site_map: SiteMap,
    tasks: Sequence[str | Mapping[str, Any]],
    spec: SparsifySpec | None = None,
    biases: SponBiases | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    add_bos: bool | None = None,
) -> TaskScores:
    """Run lm-eval ``tasks`` (names or task-config dicts) on ``model`` with ``spec`` / ``biases``
    attached (dense when both are None); hooks are removed afterwards. ``add_bos``: lm-eval's
    ``add_bos_token`` (None: the tokenizer's own default), see :func:`bos_for_lm_eval`."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)
    with sparsified(model, site_map, spec), maybe_attached(biases, model, site_map):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=TaskManager(),
            log_samples=True,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return _scores(out)


def _scores(out: Mapping[str, Any]) -> TaskScores:
    """Numeric metrics per task (filter suffix dropped), sample counts, per-choice log-likelihoods."""
    scores = {
        task: {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if isinstance(value, int | float) and "stderr" not in key and key != "sample_len"
        }
        for task, values in out["results"].items()
    }
    samples = out.get("samples", {})
    lls = {
        task: [[float(r[0]) for r in s["filtered_resps"]] for s in docs]
        for task, docs in samples.items()
    }
    return TaskScores(scores, {t: len(d) for t, d in samples.items()}, lls)


@dataclass(frozen=True)
class CellRef:
    """Which network of a finished run: ``variant`` dense / teal / spon of ``config`` at
    ``sparsity`` (``seed``: a training seed of the config, default its first)."""

    config: str | None = None
    sparsity: float | None = None
    variant: str = "spon"
    seed: int | None = None

    def label(self) -> str:
        if self.variant == "dense":
            return "dense"
        return f"{self.config} s={self.sparsity:g} {self.variant}" + (
            f" seed {self.seed}" if self.variant == "spon" else ""
        )


@dataclass(frozen=True)
class TaskOptions:
    """lm-eval settings passed through: documents per task, few-shot examples, batch size."""

    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8


def task_list(names: Sequence[str], local: Sequence[Path] = (), demo: bool = False) -> list:
    """Hub task names, then one :func:`local_task` per JSONL file (and the bundled demo)."""
    tasks: list[str | dict[str, Any]] = list(names)
    tasks += [local_task(path) for path in local]
    if demo:
        tasks.append(local_task(DEMO_TASK, "sponlab_demo"))
    if not tasks:
        raise ValueError("no task: pass --tasks NAME[,NAME], --local FILE.jsonl or --demo")
    return tasks


def run_cell(
    params_path: Path,
    cell: CellRef,
    tasks: Sequence[str | Mapping[str, Any]],
    options: TaskOptions = TaskOptions(),
    model: Path = BASE,
    thresholds: Path = THRESHOLDS,
    spon: Path = SPON,
    out: Path | None = None,
) -> Path:
    """Evaluate one network of a finished pipeline run on ``tasks``; writes and returns a JSON."""
    from sponlab.config import load_params
    from sponlab.io.provenance import write_metrics
    from sponlab.method.experiment import cell_spec
    from sponlab.method.spon import load_biases
    from sponlab.model.loading import load_model
    from sponlab.model.sites import discover_sites

    if cell.variant not in VARIANTS:
        raise ValueError(f"--variant must be one of {list(VARIANTS)}, got {cell.variant!r}")
    if cell.variant != "dense" and (cell.config is None or cell.sparsity is None):
        raise ValueError(f"--variant {cell.variant} needs --config and --sparsity")
    params = load_params(params_path)
    if cell.variant != "dense":  # checked before the model loads
        config = params.config(cell.config)
        sparsity = params.check_sparsity(cell.sparsity)
    loaded = load_model(model, params.base.device, params.base.dtype, params.base.device_map)
    site_map = discover_sites(loaded.model)
    spec, biases, seed = None, None, cell.seed
    if cell.variant != "dense":
        spec = cell_spec(params, config, sparsity, site_map, thresholds, loaded.fingerprint)
        seed = config.seeds[0] if seed is None else seed
    if cell.variant == "spon":
        file = seed_path(cell_path(spon, cell.config, sparsity), seed) / "biases.safetensors"
        biases = load_biases(file, site_map, sparsity, loaded.fingerprint)[0].to(loaded.device)
    cell = CellRef(cell.config, cell.sparsity, cell.variant, seed)
    log.info("lm-eval on %s: %d task(s)", cell.label(), len(tasks))
    result = evaluate_tasks(
        loaded.model, loaded.tokenizer, site_map, tasks, spec, biases, **asdict(options),
        add_bos=bos_for_lm_eval(loaded.tokenizer, params.data.bos),
    )  # fmt: skip
    name = cell.variant + (f"-seed{seed}" if cell.variant == "spon" else "")
    root = LMEVAL
    where = root / "dense" if spec is None else cell_path(root, cell.config, cell.sparsity)
    payload = {"network": cell.label(), **asdict(cell), "options": asdict(options)}
    payload |= {"scores": result.scores, "samples": result.samples}
    return write_metrics(out or where / f"{name}.json", payload, loaded.device, loaded.dtype)
