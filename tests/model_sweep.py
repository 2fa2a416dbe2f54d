"""The MoE model types of the installed transformers, each as a tiny random model, fused or not.

    python tests/model_sweep.py              # print one row per model type
    python tests/model_sweep.py --write      # (re)write docs/models.md (transformers 5.25)

Found from the library itself: every model type whose modeling file defines a class named
`...Experts`, `...MoE`/`...Moe...`. Each gets a tiny config (hidden 64, 2 layers, 8 experts, top-2;
`FIELDS` adds what a family needs), a float32 model from `AutoModelForCausalLM` (else `AutoModel`),
is prepared and compiled with the megamoe backend (reference kernel, eager inner backend) and
compared with its eager output. `tests/test_model_sweep.py` asserts each row and that
docs/models.md says the same; this module is its helper, not a test.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import warnings

import torch

import megamoe_compile as mc

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "models.md")
DOCS_TRANSFORMERS = "5.25"  # docs/models.md lists the newest tested release's model types
SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, head_dim=32, vocab_size=128, num_experts=8,
             n_routed_experts=8, num_local_experts=8, num_experts_per_tok=2, moe_topk=2, top_k=2, n_group=1,
             topk_group=1, first_k_dense_replace=1, max_position_embeddings=256, q_lora_rank=16, kv_lora_rank=16,
             qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, shared_expert_intermediate_size=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# What a family's tiny config needs besides SMALL (layer patterns that must keep an attention layer, ...).
FIELDS: dict[str, dict] = {
    "doge": dict(is_moe=True),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["full_attention", "conv"]),
    "nemotron_h": dict(layers_block_type=["full_attention", "moe"]),
}
MAX_PARAMETERS = 20_000_000
EXACT = dict(atol=1e-6, rtol=1e-6)  # float32, reference kernel: the fused op computes what the experts do


@dataclasses.dataclass
class Row:
    model_type: str
    status: str  # "fused", "partly fused", "unfused", "no MoE layer", "not checked"
    detail: str = ""
    fused: int = 0
    layers: int = 0
    max_diff: float | None = None

    def markdown(self) -> str:
        count = f"{self.fused}/{self.layers}" if self.layers else "-"
        return f"| {self.model_type} | {self.status} | {count} | {self.detail.replace('|', '/')} |"


def model_types() -> list[str]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        path = os.path.join(root, module, f"modeling_{module}.py")
        if os.path.exists(path):
            with open(path) as f:
                if re.search(r"class \w*(Experts|MoE|Moe)\w*\(", f.read()):
                    found.append(model_type)
    return sorted(found)


def _small_fields(config, model_type: str, sizes: dict | None = None) -> dict:
    """SMALL's fields this config has (set even where its default is None: top_k, head_dim, ...),
    per-layer lists cut to the first and the last layer, then FIELDS[model_type]."""
    layers = getattr(config, "num_hidden_layers", None)
    small = {name: value for name, value in {**SMALL, **(sizes or {})}.items()
             if hasattr(config, name) and name != "q_lora_rank"
             or (name == "q_lora_rank" and getattr(config, name, None) is not None)}
    if getattr(config, "qk_rope_head_dim", None) is not None:  # MLA: rope and head dims go together
        small["head_dim"] = 16
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and layers and len(value) == layers:
            small[name] = [value[0], value[-1]]
    small.update(FIELDS.get(model_type, {}))
    return small


def _tiny_config(model_type: str, sizes: dict | None = None):
    """The model type's config with its decoder shrunk: built with the small fields where the config
    class takes them (its own checks and derived fields then agree), else set on the default."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    text = config.get_text_config(decoder=True)
    small = _small_fields(text, model_type, sizes)
    try:
        if text is config:
            return AutoConfig.for_model(model_type, **small)
        key = next(k for k, v in vars(config).items() if v is text)  # "text_config", ...
        return AutoConfig.for_model(model_type, **{key: {**text.to_dict(), **small}})
    except Exception:  # a field the constructor refuses: set them one by one on the default
        for name, value in small.items():
            try:
                setattr(text, name, value)
            except Exception:
                pass
        return config


def _model_classes(config) -> list[type]:
    """The modeling module's own classes for `config` (its ...ForCausalLM first, then its models), for
    configs the Auto classes do not map (a composite model's text or thinker part)."""
    import importlib
    import inspect

    from transformers import PreTrainedModel

    module_name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    found = [c for _, c in inspect.getmembers(module, inspect.isclass)
             if issubclass(c, PreTrainedModel) and getattr(c, "config_class", None) is type(config)
             and not c.__name__.endswith("PreTrainedModel") and c.__name__.endswith(("ForCausalLM", "Model"))]
    return sorted(found, key=lambda c: (not c.__name__.endswith("ForCausalLM"), not c.__name__.endswith("Model"),
                                        c.__name__))


def build(model_type: str, sizes: dict | None = None, max_parameters: int | None = None) -> torch.nn.Module:
    """A tiny random float32 model of `model_type` (`sizes` replaces some of SMALL's fields; a model of
    more than `max_parameters`, default MAX_PARAMETERS, is not built)."""
    max_parameters = MAX_PARAMETERS if max_parameters is None else max_parameters
    from transformers import AutoModel, AutoModelForCausalLM

    config = _tiny_config(model_type, sizes)
    text = config.get_text_config(decoder=True)
    errors = []
    makers = [(auto.from_config, cfg) for auto in (AutoModelForCausalLM, AutoModel) for cfg in (config, text)]
    makers += [(cls._from_config, text) for cls in _model_classes(text)]
    for make, cfg in makers:
        try:
            with torch.device("meta"):  # sized first: a sub-model the shrinking missed can be GBs
                size = sum(p.numel() for p in make(cfg).parameters())
            if size > max_parameters:
                errors.append(f"the tiny config still has {size / 1e6:.0f}M parameters (a sub-model not shrunk)")
                continue
            torch.manual_seed(0)
            return make(cfg).float().eval()
        except Exception as e:  # noqa: PERF203
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    unmapped = [e for e in errors if not e.startswith("ValueError: Unrecognized configuration class")]
    raise RuntimeError((unmapped or errors)[0])


def _output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def row(model_type: str) -> Row:
    """Build, prepare, compile and compare one model type. Exceptions from megamoe_compile propagate
    (a test failure); a tiny model that transformers cannot build or run is a "not checked" row."""
    try:
        model = build(model_type)
    except Exception as e:
        return Row(model_type, "not checked", f"no tiny model: {str(e)[:200]}")
    torch._dynamo.reset()
    config = mc.MegaMoEConfig(kernel="reference", inner_backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mc.prepare(model, config)  # never raises on a model's structure
    plans = mc.layer_plans(model)
    others = mc.models.unrecognised_moe_modules(model)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            expected = _output(model(input_ids=ids))
    except Exception as e:
        reasons = sorted({p.reason for p in plans if not p.fuse} | {why for _, why in others})
        return Row(model_type, "not checked", f"its tiny model does not run on input_ids alone "
                   f"({type(e).__name__}); planned {sum(p.fuse for p in plans)}/{len(plans)}"
                   + (f"; {reasons[0]}" if reasons else ""), layers=len(plans))
    be = mc.backend(config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _output(torch.compile(model, backend=be)(input_ids=ids))
    diff = (got - expected).abs().max().item()
    fusions = be.fusions
    fused = sum(f.fused for f in fusions)
    layers = max(len(fusions), len(plans))
    reasons = list(dict.fromkeys([f.reason for f in fusions if not f.fused and f.reason] +
                                 [p.reason for p in plans if not p.fuse and p.reason] + [why for _, why in others]))
    if not layers and not others:
        return Row(model_type, "no MoE layer", "no MoE module in this model (a component of a larger model)",
                   max_diff=diff)
    status = "fused" if layers and fused == layers and not others else "partly fused" if fused else "unfused"
    return Row(model_type, status, "; ".join(reasons[:2]), fused, layers or len(others), diff)


def docs_fused() -> list[str]:
    """The model types docs/models.md lists as fused."""
    return [t for t, line in docs_rows().items() if line.split("|")[2].strip() == "fused"]


def docs_rows() -> dict[str, str]:
    """model type -> its line in docs/models.md."""
    with open(DOCS) as f:
        return {m.group(1): line.rstrip("\n") for line in f if (m := re.match(r"\| (\S+) \|", line))}


def main(argv: list[str]) -> None:
    import transformers

    rows = []
    for model_type in model_types():
        rows.append(row(model_type))
        print(rows[-1].markdown(), flush=True)
    if "--write" in argv:
        counts = {s: sum(r.status == s for r in rows) for s in ("fused", "partly fused", "unfused", "no MoE layer",
                                                                 "not checked")}
        with open(DOCS, "w") as f:
            f.write(f"# MoE model types of transformers {transformers.__version__}\n\n"
                    "Written by `python tests/model_sweep.py --write`; `tests/test_model_sweep.py` checks every row "
                    "against the library on each run (CI, transformers 5.25). One tiny random float32 model per "
                    "model type whose modeling code defines an experts or MoE class; fused rows match eager "
                    f"transformers within {EXACT['atol']:g}.\n\n"
                    + ", ".join(f"{n} {s}" for s, n in counts.items()) + "\n\n"
                    "| model type | status | fused layers | reason |\n|---|---|---|---|\n")
            for r in rows:
                f.write(r.markdown() + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
