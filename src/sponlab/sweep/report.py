"""The run's report: one Markdown file written only from metrics and plot files, never by hand.

Sections: what ran (model, data, protocol, versions), the summary table, the findings with
verdicts, every sweep figure with a caption that states what it shows and what this run found,
then the analyses (interpretability, layer importance, SAEs and importance, weight spectra) with
their key numbers. Figures are linked relative to the report's own folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sponlab.stats import SUPPORTED, outcome, pooled_floor
from sponlab.sweep.summary import dr_test, protocol_line, seed_values, sparsity_key, to_markdown


@dataclass
class RunFiles:
    """What a finished run wrote that the report reads (missing analyses are skipped)."""

    params: Any  # sponlab.config.Params
    dense: Mapping[str, Any]
    summary: pd.DataFrame
    findings_md: str | None
    interpret: Mapping[str, Any] | None
    layers: Mapping[str, Any] | None
    sae: Mapping[str, Any] | None
    importance: Mapping[str, Any] | None
    spectrum: Mapping[str, Any] | None
    figures: Mapping[str, Path]  # figure key -> file
    transfer_md: str | None = None  # the transfer stage's table (unseen text domains)
    training_md: str | None = None  # transfer-training: damage recovered per training set
    curve_md: str | None = None  # learning-curve (a second sweep): recovery against training tokens


def _figure(report_dir: Path, path: Path | None, caption: str) -> list[str]:
    if path is None or not path.is_file():
        return []
    rel = os.path.relpath(path, report_dir)
    return [f"![{caption}]({rel})", "", f"*{caption}*", ""]


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.{digits}f}"


def _percent(share: Any) -> str:
    """A share in [0, 1] as a whole percentage; ``n/a`` when undefined (null/nan in the JSON)."""
    return "n/a" if share is None or pd.isna(share) else f"{100 * float(share):.0f}%"


def run_section(run: RunFiles) -> list[str]:
    """Model, data, perplexity protocol and versions."""
    p, env = run.params, run.dense.get("env", {})
    data = p.data
    return [
        "## What ran",
        "",
        f"- Model: `{p.base.name}` (source `{p.base.source}`), {run.dense['num_layers']} layers, "
        f"{run.dense['parameters'] / 1e6:.1f}M parameters, {env.get('dtype')} on {env.get('device')}.",
        f"- Data: `{data.source}`; {data.calib_blocks} calibration, {data.train_blocks} training, "
        f"{data.val_blocks} validation and {data.test_blocks} test blocks of {data.block_len} tokens.",
        f"- Perplexity protocol: {protocol_line(run.dense)}; sparsification "
        f"`{p.sparsify.method}` on {run.dense.get('protocol', {}).get('sparsified_tokens', 'all')}"
        f" tokens, {env.get('dtype')}. Dense perplexity {run.dense['ppl']:.2f}.",
        f"- Sweep: {len(p.swept)} configs x sparsities {list(p.sparsities)}; "
        f"{p.train.epochs} epochs, lr {p.train.lr}, batch {p.train.batch_size}.",
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "dtype")),
        "",
    ]


def _best(frame: pd.DataFrame, sparsity: float) -> str:
    """Which trained cells recover the most at one sparsity: the top cell alone only if it beats
    every other beyond noise (seeds and test blocks), else all cells it does not beat."""
    group = frame[(frame["sparsity"] == sparsity) & frame["damage_recovered"].notna()]
    group = group[group["bias_parameters"] > 0]
    if group.empty:
        return "no cell with measurable damage"
    floor = pooled_floor([seed_values(v) for v in group["damage_recovered_seeds"]])
    rows = sorted(group.itertuples(), key=lambda r: -r.damage_recovered)
    top = rows[0]
    tied = [r for r in rows[1:] if outcome(dr_test(top, r, floor)) != SUPPORTED]
    if not tied:
        return f"{top.config} recovers most at s={sparsity:g} ({100 * top.damage_recovered:.1f}%)"
    names = ", ".join(f"{r.config} {100 * r.damage_recovered:.1f}%" for r in [top, *tied])
    return f"at s={sparsity:g} no cell recovers most beyond noise: {names}"


def sweep_figures(run: RunFiles, report_dir: Path) -> list[str]:
    """The sweep figures, each with a caption carrying this run's key number."""
    frame, figs = run.summary, run.figures
    sparsities = sorted(frame["sparsity"].unique())
    best = "; ".join(_best(frame, s) for s in sparsities)
    teal = "; ".join(
        f"TEAL {frame[frame['sparsity'] == s]['teal_ppl'].max():.1f} at s={s:g}" for s in sparsities
    )
    pareto = ", ".join(
        sorted(set(frame[frame["pareto"] & (frame["bias_parameters"] > 0)]["config"]))
    )
    lines = ["## Sweep figures", ""]
    lines += _figure(
        report_dir,
        figs.get("ppl"),
        f"Test perplexity, TEAL-only vs TEAL+SPON per config (dense {run.dense['ppl']:.1f}; {teal}).",
    )
    lines += _figure(
        report_dir,
        figs.get("damage"),
        f"Share of the TEAL damage recovered (mean ± seed sd). {best}.",
    )
    lines += _figure(
        report_dir,
        figs.get("pareto"),
        f"Perplexity vs bias parameters; on the frontier at some sparsity: {pareto or 'none'}.",
    )
    lines += _figure(
        report_dir, figs.get("loss"), "Training KL per step (first seed of each cell)."
    )
    for s in sparsities:
        lines += _figure(
            report_dir,
            figs.get(f"shift_{sparsity_key(s)}"),
            f"Hidden-state shift from dense by layer at s={s:g}: TEAL-only (dashed) and each config.",
        )
    return lines


def analysis_sections(run: RunFiles, report_dir: Path) -> list[str]:
    """Interpretability, layer importance, SAE / importance and spectrum key numbers."""
    lines: list[str] = []
    if run.interpret:
        lines += interpret_section(run.interpret, run.figures, report_dir)
    if run.layers:
        lines += layers_section(run.layers, run.figures, report_dir)
    if run.sae or run.importance:
        lines += ["## SAEs and activation / gradient importance", ""]
        if run.sae:
            lines.append(
                f"- SAEs on layers {', '.join(map(str, run.sae['layers']))}: mean held-out FVE "
                f"{run.sae['mean_fve']:.3f}, mean L0 {run.sae['mean_l0']:.1f}."
            )
        if run.importance:  # its wall-clock timings stay in the metrics file: not results
            layers = run.importance.get("layers", {})
            tokens = run.importance["passes"]["values"]["tokens"]
            lines.append(
                f"- Importance of values and loss gradients over {tokens} tokens: MLP features on "
                f"{len(layers.get('mlp', []))} layers, SAE features on {len(layers.get('sae', []))}"
                " (pass timings: metrics/importance.json)."
            )
        lines.append("")
        lines += _figure(report_dir, run.figures.get("importance"), "Gradient importance by layer.")
    if run.transfer_md:
        lines += [
            "## Out of domain: code, technical, multilingual and story text",
            "",
            "The transfer stage's cells on text no stage trained, calibrated or tested on "
            "(`metrics/transfer/summary.md`); the claims re-tested there are in the findings "
            "above.",
            "",
            run.transfer_md.strip(),
            "",
        ]
        lines += _figure(
            report_dir,
            run.figures.get("transfer"),
            "Damage recovered per text domain (mean ± seed sd; empty: TEAL damage within noise).",
        )
    if run.training_md:
        lines += [
            "### Does more or other training text transfer?",
            "",
            "The transfer-training stage retrains one config on training sets of several sizes "
            "and domain mixes (`metrics/transfer_training/training.md`): damage recovered "
            "(mean ± seed sd) on the in-domain test blocks and on each domain's held-out half.",
            "",
            run.training_md.strip(),
            "",
        ]
        lines += _figure(
            report_dir, run.figures.get("training"), "Damage recovered against training blocks."
        )
    if run.curve_md:
        lines += curve_section(run, report_dir)
    if run.spectrum:
        lines += spectrum_section(run.spectrum, run.figures, report_dir)
    return lines


def curve_section(run: RunFiles, report_dir: Path) -> list[str]:
    """The learning curve: is the default's recovery a result about SPON or about its budget?"""
    lines = [
        "## How recovery grows with training tokens",
        "",
        "The learning-curve stage (a second sweep, frozen in `dvc.yaml`; its committed output is "
        "what this section shows: `metrics/learning_curve/curve.md`) retrains configs from zeros "
        "on nested draws of 16 to 512 training blocks per seed, with the run's training settings, "
        "and scores each on the test blocks and on a transfer domain (mean ± seed sd).",
        "",
        str(run.curve_md).strip(),
        "",
    ]
    return lines + _figure(
        report_dir, run.figures.get("curve"), "Damage recovered against distinct training tokens."
    )


def interpret_section(
    metrics: Mapping[str, Any], figs: Mapping[str, Path], report_dir: Path
) -> list[str]:
    """What the biases encode: size, alignment, drift, prompts, similarity."""
    lines = [f"## What the biases encode (s={metrics['sparsity']:g})", ""]
    for name, cp in metrics["checkpoints"].items():
        bias, align, shift = cp.get("bias", {}), cp.get("alignment", {}), cp.get("shift", {})
        lines.append(
            f"- {name}: {bias.get('sites')} sites, bias / dense output RMS "
            f"{_fmt(bias.get('l2_rel'), 4)}; cosine with the mean sparsification error "
            f"{_fmt(align.get('cos_global'), 3)} (chance {_fmt(align.get('chance_abs_cos'), 3)}); "
            f"final-layer drift {_fmt(shift.get('test_final_teal_rel'), 3)} -> "
            f"{_fmt(shift.get('test_final_spon_rel'), 3)}."
        )
    lines.append("")
    lines += _figure(
        report_dir, figs.get("similarity"), "Bias cosine similarity between checkpoints."
    )
    lines += _figure(
        report_dir, figs.get("prompts"), "KL to dense per prompt category and variant."
    )
    return lines


def layers_section(
    metrics: Mapping[str, Any], figs: Mapping[str, Path], report_dir: Path
) -> list[str]:
    """Leave-one-layer-out: how many layers carry the benefit."""
    needed = metrics.get("layers_needed", {}).get("measured", {})
    share = metrics.get("phase_share", {}).get("importance", {})
    lines = [
        f"## Where the biases matter ({metrics['config']}, s={metrics['sparsity']:g})",
        "",
        f"- Validation ppl TEAL {metrics['ppl_teal']:.2f} -> {metrics['ppl_full']:.2f} with all "
        "biases; layers needed for "
        + ", ".join(
            f"{100 * float(k):.0f}%: {'n/a' if v is None else v}" for k, v in needed.items()
        )
        + " of the benefit.",
        "- Importance share early / middle / late: "
        + " / ".join(_percent(share[k]) for k in ("early", "middle", "late") if k in share)
        + ".",
        "",
    ]
    return lines + _figure(report_dir, figs.get("layers"), "Leave-one-layer-out importance.")


def spectrum_section(
    metrics: Mapping[str, Any], figs: Mapping[str, Path], report_dir: Path
) -> list[str]:
    """Weight spectra: effective rank ratios, attention kernels, down_proj SVD."""
    ratio = metrics.get("erank_ratio_mean", {})
    down = metrics.get("down_proj", {})
    lines = [
        "## Weight spectra",
        "",
        "- Mean effective-rank ratio: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()) + ".",
        f"- down_proj of layer {down.get('layer')}: condition number "
        f"{_fmt(down.get('condition_number'), 1)}, {down.get('k90')} components for 90% of the "
        "energy.",
        "",
    ]
    return lines + _figure(report_dir, figs.get("erank"), "Effective rank by layer and projection.")


def build_report(run: RunFiles, report_dir: Path) -> str:
    """The whole report as Markdown (links relative to ``report_dir``)."""
    lines = ["# sponlab run report", "", *run_section(run)]
    lines += ["## Summary", "", to_markdown(run.summary), ""]
    if run.findings_md:
        lines += ["## The study's claims, re-tested", "", run.findings_md.strip(), ""]
    lines += sweep_figures(run, report_dir)
    lines += analysis_sections(run, report_dir)
    return "\n".join(lines).rstrip() + "\n"


FIGURES: Sequence[tuple[str, str]] = (
    ("ppl", "plots/sweep/ppl_by_config.png"),
    ("damage", "plots/sweep/damage_recovered.png"),
    ("pareto", "plots/sweep/pareto.png"),
    ("loss", "plots/sweep/loss_curves.png"),
    ("similarity", "plots/interpret/similarity/similarity.png"),
    ("prompts", "plots/interpret/prompts/kl.png"),
    ("layers", "plots/interpret/layers/importance.png"),
    ("importance", "plots/importance/mlp/gradients_mean_abs_norm-sum_abs_all_layers.png"),
    ("erank", "plots/spectrum/erank_ratio_by_layer.png"),
    ("transfer", "plots/transfer/damage_by_domain.png"),
    ("training", "plots/transfer_training/training.png"),
    ("curve", "plots/learning_curve/curve.png"),
)
