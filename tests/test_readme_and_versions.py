"""The README and the docs pages cannot go stale: every code block of README.md and docs/*.md is
run or checked here, every docs page is linked from the README, and the README stays short; the tested transformers
releases are one fact, said alike by the requirement, the README, CI and `models.TESTED_TRANSFORMERS`;
an untested release is warned about; a DeepGEMM release that cannot load on this torch is named."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import input_ids, tiny_model

import megamoe_compile as mc
from megamoe_compile import models

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# The pages whose code a user runs after the README's, in reading order (their Python blocks share
# one namespace with the README's).
RUN_AFTER_README = ("docs/generation.md",)
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
README_MAX_CHARS = 8000  # the rest lives in docs/


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _page(path: str) -> str:
    return (ROOT / path).read_text()


@pytest.mark.parametrize("path", ["README.md", *PAGES])
def test_every_block_is_a_known_kind_and_run_or_checked(path):
    fences = re.findall(r"^```(\w*)$", _page(path), flags=re.M)
    openings = fences[0::2]
    assert set(openings) <= {"python", "bash", "text"}, openings
    if "python" in openings:
        assert path == "README.md" or path in RUN_AFTER_README, f"{path}: its Python blocks are not run by a test"
    if "text" in openings:
        assert path == "docs/reading-a-report.md", f"{path}: its text blocks are not checked by a test"


def test_the_readme_is_short_and_links_every_docs_page():
    assert len(README) <= README_MAX_CHARS, len(README)
    for page in PAGES:
        assert f"]({page})" in README, f"README does not link {page}"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README + "".join(_page(p) for p in PAGES)):
        if not target.startswith("http"):
            assert (ROOT / target).exists() or (ROOT / "docs" / target).exists(), target


def test_readme_python_blocks_run(monkeypatch):
    """Run the README's Python blocks in order, in one namespace, as a user would: `path` and
    `input_ids` are what the user brings (no hub here: from_pretrained builds a tiny model)."""
    from transformers import DeepseekV4ForCausalLM

    def from_pretrained(path, dtype=None, device_map=None, **kwargs):
        return tiny_model(layers=2, dtype=dtype or torch.float32)  # CPU: device_map is the user's GPU

    monkeypatch.setattr(DeepseekV4ForCausalLM, "from_pretrained", staticmethod(from_pretrained))
    from helpers import family_model
    from transformers import AutoModelForCausalLM

    def family_from_pretrained(path, dtype=None, device_map=None, **kwargs):
        assert path == "Qwen/Qwen3-30B-A3B", path
        return family_model("qwen3_moe", dtype=dtype or torch.float32)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(family_from_pretrained))
    blocks = _blocks("python") + [b for page in RUN_AFTER_README for b in _blocks("python", _page(page))]
    assert len(blocks) >= 4
    namespace = {"path": "deepseek-ai/DeepSeek-V4-Flash", "input_ids": input_ids()}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    model, ids = namespace["model"], namespace["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(namespace["logits"].float(), expected.float(), atol=2e-2, rtol=2e-2)  # bf16
    v4_tokens, v4_ids = namespace["v4_tokens"], namespace["input_ids"]
    mc.disable_static_decode(model)
    with torch.no_grad():  # transformers' own eager generate with its dynamic cache
        assert torch.equal(v4_tokens, model.generate(v4_ids, max_new_tokens=32, do_sample=False))
    qwen, tokens = namespace["qwen"], namespace["tokens"]
    assert mc.layer_plans(qwen) and all(plan.fuse for plan in mc.layer_plans(qwen))
    with torch.no_grad():  # on CPU transformers does not auto-compile: the tokens are its eager static-cache ones
        assert torch.equal(tokens, qwen.generate(ids, max_new_tokens=64, do_sample=False, cache_implementation="static"))
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] >= 1


def test_readme_setup_commands_are_what_ci_runs():
    (setup,) = _blocks("bash")
    commands = [line for line in setup.splitlines() if line and not line.startswith("#")]
    install_and_demo, tests = commands
    ci = (ROOT / ".ci" / "run").read_text()
    for step in install_and_demo.split(" && "):
        if "demo.py" not in step:
            assert step.replace("python -m pip install", "python -m pip install -q") in ci, step
    assert re.search(rf"^{re.escape(tests)}$", ci, flags=re.M), "CI must run the README's test command"
    assert (ROOT / "examples" / "demo.py").exists()


def test_readme_report_block_has_the_report_columns():
    (report,) = _blocks("text", _page("docs/reading-a-report.md"))
    text = str(mc.explain(tiny_model(layers=2), input_ids(), config=mc.MegaMoEConfig(inner_backend="eager")))
    header = [line for line in text.splitlines() if line.startswith("layer")][0]
    assert report.splitlines()[1].split() == header.split()
    assert re.match(r"MegaMoE: \d+ of \d+ MoE layers fused, \d+ graph\(s\) compiled", report)
    assert re.search(r"expert weights: [\d.]+ MiB as loaded, [\d.]+ MiB kernel-ready copies", report)


# -- tested transformers releases --------------------------------------------------------------

def test_the_tested_releases_are_one_fact():
    (first, last) = models.TESTED_TRANSFORMERS
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"transformers>={first[0]}.{first[1]}"' in pyproject  # no upper bound: newer releases warn
    tested = README[README.index("## Tested versions"):README.index("## Tests")]
    for minor in range(first[1], last[1] + 1):
        assert f"**{first[0]}.{minor}**" in tested
    ci = (ROOT / ".ci" / "run").read_text()
    for version in (first, last):  # CI runs the newest and the oldest tested release
        assert f"{version[0]}.{version[1]}.0" in ci


def test_an_untested_release_is_warned_about(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    assert "transformers 5.99.0 is not a release megamoe-compile was tested with (5.23-5.25)" in \
        models.untested_transformers()
    with pytest.warns(UserWarning, match=r"transformers 5\.99\.0 is not a release .*tested with \(5\.23-5\.25\)"):
        mc.prepare(tiny_model(), mc.MegaMoEConfig())


def test_a_tested_release_is_not_warned_about():
    assert models.untested_transformers() == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc.prepare(tiny_model(), mc.MegaMoEConfig())


def test_layers_of_an_untested_release_that_trace_differently_say_so(monkeypatch):
    """A release whose experts code traces to other ops: reported "not recognised for transformers
    X.Y", left exactly as traced (stand-in: an extra op in the experts' SwiGLU)."""
    import transformers

    model = tiny_model(layers=2)
    mc.prepare(model, mc.MegaMoEConfig(inner_backend="eager"))
    experts = model.model.layers[1].mlp.experts
    original = type(experts)._apply_gate

    def traced_differently(self, gate_up):
        return original(self, gate_up) * 1.0  # one extra multiply

    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    be = mc.backend(inner_backend="eager")
    with torch.no_grad():
        expected = model(input_ids()).logits
        monkeypatch.setattr(type(experts), "_apply_gate", traced_differently)
        got = torch.compile(model, backend=be)(input_ids()).logits
    torch.testing.assert_close(got, expected)
    reasons = [f.reason for f in be.fusions if not f.fused]
    assert reasons and all(r.startswith("not recognised for transformers 5.99.0 (untested release)") for r in reasons)


# -- DeepGEMM release against torch ------------------------------------------------------------

@pytest.mark.parametrize("torch_version, release, fits", [
    ("2.11.0+cu130", "0.1.5", True),
    ("2.11.0+cu130", "0.1.4.post1", True),
    ("2.11.0+cu130", "0.2.5", False),
    ("2.13.0+cu130", "0.2.5", True),
    ("2.13.0", "0.1.5", False),
    ("2.14.1", "0.1.4", False),
    ("2.12.0", "0.1.5", True),  # no release is known to us for 2.12: not refused
    ("2.13.0", None, True),  # not installed: the import tells
])
def test_deepgemm_release_is_checked_against_torch(torch_version, release, fits):
    from megamoe_compile.ops import deepgemm

    why = deepgemm.release_problem(torch_version, release)
    assert (why == "") == fits
    if not fits:
        assert f"sgl-deep-gemm {release}" in why and torch_version in why and "pip install" in why
        assert ("0.1.6" in why) == torch_version.startswith("2.11")


def test_a_misfit_deepgemm_release_leaves_layers_unfused_with_the_release_to_install(monkeypatch):
    from megamoe_compile.ops import deepgemm

    monkeypatch.setattr(deepgemm, "_sgl_version", lambda: "0.1.5")
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    deepgemm.reset_probe()
    try:
        module, why = deepgemm._deep_gemm()
        assert module is None and 'pip install "sgl-deep-gemm>=0.2"' in why
    finally:
        monkeypatch.undo()
        deepgemm.reset_probe()


def test_the_report_of_a_model_without_recognised_layers_says_what_is_recognised():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="no MoE layer this version recognises"):
        report = mc.explain(model, torch.randn(2, 4), config=mc.MegaMoEConfig(inner_backend="eager"))
    assert "0 of 0 MoE layers fused" in str(report) and "DeepSeek-V4" in str(report)

