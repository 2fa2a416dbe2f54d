"""Every MoE model type of the installed transformers (found from the library, `model_sweep.py`):
prepare and compile never raise; a fused model type matches eager transformers float32-exactly; an
unfused one says why; docs/models.md says the same (on the release it lists)."""

from __future__ import annotations

import pytest
import torch
from model_sweep import DOCS_TRANSFORMERS, EXACT, docs_rows, model_types, row

from megamoe_compile import models

MODEL_TYPES = model_types()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend
    yield
    torch.set_num_threads(threads)


def test_the_readme_counts_are_those_of_docs_models():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    counts = re.search(r"(\d+) fused, \d+ partly fused, (\d+) unfused, \d+ no MoE layer, (\d+) not checked",
                       (root / "docs" / "models.md").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    fused, unfused, unchecked = counts.groups()
    assert (f"transformers {DOCS_TRANSFORMERS}, as a tiny model: {fused} fused, {unfused} unfused with the reason, "
            f"{unchecked} not checked") in readme


def test_the_sweep_finds_the_families_we_know():
    assert {"deepseek_v4", "qwen3_moe", "mixtral", "deepseek_v3", "dbrx", "jetmoe"} <= set(MODEL_TYPES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_model_type(model_type):
    r = row(model_type)
    if r.status in ("fused", "partly fused", "unfused", "no MoE layer"):
        torch.testing.assert_close(torch.tensor(r.max_diff), torch.tensor(0.0), **EXACT)
    if r.status in ("partly fused", "unfused"):
        assert r.detail, f"{model_type}: left unfused without a reason"
    if models.transformers_version() == tuple(int(v) for v in DOCS_TRANSFORMERS.split(".")):
        assert docs_rows().get(model_type) == r.markdown(), (
            f"docs/models.md is out of date for {model_type}: run python tests/model_sweep.py --write")
    if r.status == "not checked":
        pytest.skip(f"{model_type}: {r.detail}")
