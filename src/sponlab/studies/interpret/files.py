"""Writing the interpret stage's tables and figures, and its metrics summary.

The stage computes (:mod:`sponlab.studies.interpret.study`); this module lays the results out as
``metrics/interpret/{bias,alignment,shift,prompts,similarity}/`` tables and the same tree of
figures under ``plots/interpret/``, each folder replaced atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sponlab.allocations import AllocationConfig
from sponlab.io.layout import cell_path, seed_path
from sponlab.io.tensorio import replace_dir, write_table
from sponlab.method.spon import SponBiases, load_biases
from sponlab.model.loading import LoadedModel
from sponlab.model.sites import SiteMap
from sponlab.studies.interpret import plots, study
from sponlab.studies.interpret import shift as sh
from sponlab.studies.interpret.directions import RandomBaseline
from sponlab.studies.interpret.params import InterpretParams
from sponlab.studies.interpret.similarity import SimilarityTable, similarity_table


def load_checkpoints(
    checkpoints: dict, spon: Path, s: float, loaded: LoadedModel, site_map: SiteMap
) -> dict[str, SponBiases]:
    """Each checkpoint's biases (name -> (config, seed)), checked against this model."""
    return {
        name: load_biases(
            seed_path(cell_path(spon, config, s), seed) / "biases.safetensors",
            site_map,
            s,
            loaded.fingerprint,
        )[0].to(loaded.device)
        for name, (config, seed) in checkpoints.items()
    }


def write_bias_reports(tables: Path, figures: Path, s: float, reports, vectors, ip) -> None:
    """Per checkpoint: stats.csv, layers.csv, alignment.csv; heatmap, histograms, norms, alignment."""
    with (
        replace_dir(tables / "bias") as bias_t,
        replace_dir(figures / "bias") as bias_f,
        replace_dir(tables / "alignment") as align_t,
        replace_dir(figures / "alignment") as align_f,
    ):
        for n, report in reports.items():
            title = f"{n} s={s:g}"
            t, f = cell_path(bias_t, n, s), cell_path(bias_f, n, s)
            write_table(t / "stats.csv", report.stats)
            write_table(t / "layers.csv", report.norms)
            plots.plot_bias_heatmap(
                vectors[n], ip.heatmap_dims, f"{title}: bias values", f / "heatmap.png"
            )
            plots.plot_bias_histograms(
                vectors[n], f"{title}: bias values per layer", f / "histograms.png"
            )
            plots.plot_layer_norms(
                report.norms, f"{title}: bias norm by layer", f / "layer_norms.png"
            )
            write_table(cell_path(align_t, n, s) / "alignment.csv", report.alignment)
            if report.residual:
                write_table(cell_path(align_t, n, s) / "residual.csv", report.residual)
            plots.plot_alignment(
                report.alignment,
                f"{title}: bias alignment",
                cell_path(align_f, n, s) / "alignment.png",
            )


def write_prompts(tables: Path, figures: Path, prompts: study.PromptReport) -> None:
    with replace_dir(tables) as out, replace_dir(figures) as fig:
        write_table(out / "effects.csv", prompts.effects)
        write_table(out / "shift_by_layer.csv", prompts.layers)
        plots.plot_prompt_effects(prompts.effects, fig / "kl.png")


def write_shift(tables: Path, figures: Path, s: float, test: dict, prompts: dict) -> None:
    """Per config: test.csv (from its evaluate cell), prompts.csv and the shift figure."""
    with replace_dir(tables) as out, replace_dir(figures) as fig:
        for n, rows in test.items():
            folder = cell_path(out, n, s)
            write_table(folder / "test.csv", rows)
            write_table(
                folder / "prompts.csv",
                [{"category": c, **r} for c, cat in prompts[n].items() for r in cat],
            )
            title = f"{n} s={s:g}: hidden-state shift vs dense"
            plots.plot_shift(rows, prompts[n], title, cell_path(fig, n, s) / "shift.png")


def write_similarity(
    tables: Path,
    figures: Path,
    checkpoints: Mapping[str, tuple[str, int]],
    vectors: Mapping[str, Any],
    baseline: RandomBaseline,
    configs: Mapping[str, AllocationConfig],
    ip: InterpretParams,
) -> SimilarityTable:
    """Pairwise bias similarity of every seed of ``interpret.similarity``: sites.csv,
    pairs.csv and the matrix figure."""
    names = [n for n, (config, _) in checkpoints.items() if config in ip.similarity]
    owners = {n: configs[config] for n, (config, _) in checkpoints.items()}
    seeds = {n: seed for n, (_, seed) in checkpoints.items()}
    table = similarity_table(names, owners, vectors, baseline, seeds)
    with replace_dir(tables) as out, replace_dir(figures) as fig:
        write_table(out / "sites.csv", table.site_rows)
        write_table(out / "pairs.csv", table.pair_rows)
        plots.plot_similarity(
            table.names, table.matrix, table.chance, table.per_layer, fig / "similarity.png"
        )
    return table


def interpret_summary(
    s: float,
    configs: Sequence[str],
    reports: Mapping[str, Any],
    prompts: study.PromptReport,
    shift: Mapping[str, Any],
    table: SimilarityTable,
) -> dict[str, Any]:
    """metrics/interpret.json's content (without timings): per checkpoint, prompts, similarity."""
    summary: dict[str, Any] = {"sparsity": s, "checkpoints": {}}
    for n in configs:
        summary["checkpoints"][n] = {
            **reports[n].summary,
            "prompt_kl_reduction": prompts.kl_reduction[n],
            "shift": sh.shift_summary(shift[n], prompts.shift[n]),
        }
    return summary | {"prompts": prompts.summary, "similarity": table.summary()}
