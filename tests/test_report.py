"""The report is written from metrics and figures only: numbers, captions and links come through."""

from pathlib import Path

from test_findings import frame

from sponlab.config import load_params
from sponlab.sweep.report import RunFiles, build_report

ROOT = Path(__file__).resolve().parents[1]


def test_report_carries_the_runs_numbers_and_relative_figure_links(tmp_path):
    table = frame(
        [
            ("UNIF-ALL", [0.30, 0.34, 0.26], {}),
            ("TOP-50", [0.29, 0.33, 0.27], {"params": 50}),
            ("ATTN-ONLY", [0.70, 0.72, 0.68], {}),
        ]
    )
    (tmp_path / "plots/sweep").mkdir(parents=True)
    png = tmp_path / "plots/sweep/damage_recovered.png"
    png.write_bytes(b"\x89PNG")
    env = {"torch": "2.13.0+cpu", "device": "cpu", "dtype": "float32"}
    dense = {"ppl": 40.0, "tokens": 4064, "num_layers": 30, "parameters": 134_515_008, "env": env}
    run = RunFiles(
        params=load_params(ROOT / "params.yaml"),
        dense=dense,
        summary=table,
        findings_md="| claim |\n|---|\n| (a) |\n",
        interpret=None,
        layers={
            "config": "UNIF-ALL",
            "sparsity": 0.5,
            "ppl_teal": 63.1,
            "ppl_full": 56.8,
            "layers_needed": {"measured": {"0.8": 4}},
            "phase_share": {"importance": {"early": 0.6, "middle": 0.3, "late": 0.1}},
        },
        sae=None,
        importance=None,
        spectrum=None,
        figures={"damage": png, "ppl": tmp_path / "missing.png"},
        curve_md="| config | blocks |\n|---|---|\n| UNIF-ALL | 128 (default) |\n",
    )
    text = build_report(run, tmp_path / "metrics")
    assert "](../plots/sweep/damage_recovered.png)" in text
    assert "missing.png" not in text  # figures not built are left out, not linked
    assert "ATTN-ONLY recovers most at s=0.5 (70.0%)" in text
    assert "134.5M parameters" in text and "torch 2.13.0+cpu" in text
    assert "80%: 4" in text and "early / middle / late: 60% / 30% / 10%" in text
    assert "## The study's claims, re-tested" in text and "| (a) |" in text
    assert "| config | sparsity |" in text
    assert "## How recovery grows with training tokens" in text and "128 (default)" in text


def test_layer_section_says_na_when_no_layers_biases_help():
    # a run whose biases help nowhere writes null shares and null layer counts (nan in JSON)
    from sponlab.sweep.report import layers_section

    layers = {
        "config": "UNIF-ALL",
        "sparsity": 0.5,
        "ppl_teal": 63.1,
        "ppl_full": 63.1,
        "layers_needed": {"measured": {"0.8": None}},
        "phase_share": {"importance": {"early": None, "middle": float("nan"), "late": None}},
    }
    text = "\n".join(layers_section(layers, {}, Path(".")))
    assert "80%: n/a" in text and "early / middle / late: n/a / n/a / n/a." in text
