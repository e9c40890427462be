"""Models embedded in PyPI wheels: chunks joined and checked against the published SHA-256, names
resolved from the source, and (slow, when installed) Gemma-3-270M de-quantised exactly as the
gguf package's reference de-quantiser does and predicting sane text."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import replace

import pytest
import torch

from sponlab.config import ConfigError
from sponlab.model import base as basemodel
from sponlab.model.base import EMBEDDED, EmbeddedModel, parse_base
from sponlab.model.loading import embedded_gguf
from sponlab.paramcheck import Section


def chunk_packages(root, parts: list[bytes]) -> tuple[str, ...]:
    """Data-only packages ``fakegguf_partN`` whose ``data/`` holds one chunk each."""
    names = []
    for i, part in enumerate(parts):
        pkg = root / f"fakegguf_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('data only: never imported')\n")
        (pkg / "data" / f"model.gguf.part{i:02d}").write_bytes(part)
        names.append(pkg.name)
    return tuple(names)


def test_chunks_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(100), bytes(range(256)), b"tail"]
    packages = chunk_packages(tmp_path / "site", parts)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(parts)
    spec = EmbeddedModel("x/y", "pip install fake", packages, "model.gguf",
                         sha256=hashlib.sha256(whole).hexdigest())  # fmt: skip
    monkeypatch.setitem(EMBEDDED, "fake", spec)
    (tmp_path / "out").mkdir()
    assert embedded_gguf("fake", tmp_path / "out").read_bytes() == whole
    assert not any(name.startswith("fakegguf") for name in sys.modules)  # read as data only
    monkeypatch.setitem(EMBEDDED, "fake", replace(spec, sha256="0" * 64))
    with pytest.raises(RuntimeError, match="not the published"):
        embedded_gguf("fake", tmp_path / "out")


def test_embedded_sources_name_themselves():
    def parse(**base):
        return parse_base(Section(base, "base", "params.yaml"))

    assert parse(source="gemma3-270m", name=None).name == "google/gemma-3-270m"
    assert parse(source="smollm2").name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ConfigError, match=r"base\.name must be null or 'google/gemma-3-270m'"):
        parse(source="gemma3-270m", name="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ConfigError, match=r"base\.name is required for base\.source 'hub'"):
        parse(source="hub")
    with pytest.raises(ConfigError, match=r"base\.source must be one of \['smollm2', 'gemma3"):
        parse(source="gemma")
    assert basemodel.BASE_SOURCES == ("smollm2", "gemma3-270m", "hub")


GEMMA = importlib.util.find_spec(EMBEDDED["gemma3-270m"].packages[0]) is not None


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA, reason="Gemma-3-270M wheels not installed (make install-gemma)")
def test_gemma_exports_exactly_and_predicts_text(tmp_path):
    from sponlab.model.loading import export_embedded_model, load_model
    from sponlab.model.sites import discover_sites

    export_embedded_model("gemma3-270m", tmp_path / "base")  # raises if a row differs from gguf's
    loaded = load_model(tmp_path / "base", "cpu", "float32")
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert discover_sites(loaded.model).num_layers == 18
    ids = loaded.tokenizer("The capital of France is Paris. The capital of Germany is",
                           return_tensors="pt").input_ids  # fmt: skip
    assert int(ids[0, 0]) == loaded.tokenizer.bos_token_id  # BOS as Gemma expects
    with torch.no_grad():
        out = loaded.model(ids, labels=ids)
    assert float(out.loss.exp()) < 30
    assert loaded.tokenizer.decode(out.logits[0, -1].argmax()).strip() == "Berlin"
