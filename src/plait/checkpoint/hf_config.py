"""Hugging Face Llama `config.json` <-> plait's `ModelArgs`, and the parameter-name mapping.

Pure Python (no torch), so the config checks can read a Hugging Face directory before anything is
built. Only what plait's model computes exactly is accepted: a config with a feature plait does
not have (biases, another activation, another rotary scaling, a head size that is not
hidden / heads) is refused with an `HFConfigError` naming the field, instead of being converted
into a model that computes something else.

Why no permutation of q_proj / k_proj: plait applies rotary embeddings in the same "rotate half"
convention as `transformers`' Llama (pairs (i, i + E/2), see `plait.model.llama.apply_rope`), so
the weights are identical and conversion is a renaming. (Meta's original Llama checkpoints use
interleaved pairs, which is why `transformers`' own converter permutes; plait never sees those.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from plait.model.sizes import ModelArgs

CONFIG_FILE = "config.json"
HF_PREFIX = "hf:"


class HFConfigError(ValueError):
    """A Hugging Face config, or a plait model, that the other side cannot represent exactly."""


# plait name -> Hugging Face LlamaForCausalLM name; "{i}" is the layer index.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_LAYER_NAMES = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {hf: ours for ours, hf in _TOP_NAMES.items()}


def to_hf_name(name: str) -> str:
    """`layers.3.attn.q_proj.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise HFConfigError(f"parameter {name!r} has no Hugging Face Llama counterpart")


def from_hf_name(name: str) -> str | None:
    """The plait name of a Hugging Face Llama parameter; None for names plait does not use
    (rotary buffers some older exports store)."""
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    if name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed from the config
    match = _HF_LAYER_RE.match(name)
    if match and match.group(2) in _HF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{_HF_LAYER_NAMES[match.group(2)]}"
    raise HFConfigError(
        f"weight {name!r} is not part of a Llama model plait can build (biases and extra modules are not supported)"
    )


# The context Llama 3.1 and 3.2 were extended to with Llama-3 rope scaling (their config.json
# says so whatever the factor: 8 for 3.1, 32 for 3.2).
LLAMA3_CONTEXT = 131072


def max_position_embeddings(args: ModelArgs, seq_len: int) -> int:
    """What to tell `transformers` the model handles: the trained length, or, when Llama-3 rope
    scaling is on, the context it was made for (`transformers` expects it above the original
    8192). It is informational: transformers' Llama computes the same logits whatever it says."""
    if args.rope_scaling_factor > 0:
        return max(seq_len, LLAMA3_CONTEXT)
    return seq_len


def hf_config_from_args(args: ModelArgs, seq_len: int, dtype: str, eos_token_id: int | None = None) -> dict[str, Any]:
    """A `config.json` for `transformers`' LlamaForCausalLM with exactly plait's shape."""
    if args.mlp != "swiglu":
        raise HFConfigError(
            f"model.mlp = {args.mlp!r}: Hugging Face's Llama has only the SwiGLU MLP, so a GELU model "
            "cannot be exported as a Llama; export a model trained with model.mlp = \"swiglu\""
        )
    if args.vocab is None:
        raise HFConfigError("the checkpoint's config has no model.vocab; it was not written by plait train")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": args.tie_embeddings,
        "max_position_embeddings": max_position_embeddings(args, seq_len),
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "torch_dtype": dtype,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
    }
    if args.rope_scaling_factor > 0:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_len,
        }
    return config


def _refuse(field: str, value: Any, why: str) -> None:
    raise HFConfigError(f"Hugging Face config.json: {field} = {value!r}: {why}")


def args_from_hf_config(config: dict[str, Any]) -> ModelArgs:
    """plait's ModelArgs for a Hugging Face Llama `config.json`; refuses what plait cannot compute."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        _refuse("model_type", model_type, "plait imports Llama models only (model_type \"llama\")")
    for arch in config.get("architectures") or []:
        if arch not in ("LlamaForCausalLM", "LlamaModel"):
            _refuse("architectures", config["architectures"], "plait imports LlamaForCausalLM only")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(field), int):
            _refuse(field, config.get(field), "a Llama config needs it as an integer")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        _refuse("hidden_act", act, "plait's SwiGLU MLP uses silu only")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            _refuse(field, config[field], "plait's linear layers have no biases")
    if config.get("pretraining_tp", 1) != 1:
        _refuse("pretraining_tp", config["pretraining_tp"], "only 1 (no sliced matmuls) is supported")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if hidden % heads or head_dim != hidden // heads:
        _refuse("head_dim", head_dim, f"plait's head size is hidden_size / num_attention_heads = {hidden} / {heads}")

    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older versions write
    # `rope_theta` and `rope_scaling` at the top level. Read either.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    scaling: dict[str, Any] = {}
    if rope_type == "llama3":
        scaling = {
            "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "rope_high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "rope_original_max_len": int(rope.get("original_max_position_embeddings", 8192)),
        }
        if scaling["rope_scaling_factor"] <= 0:
            _refuse(f"{field}.factor", rope["factor"], "must be positive")
        # A plait config sets only the factor; the other three are Llama-3's constants (ModelArgs'
        # defaults), so a model with other values could not be trained or reloaded from config.toml.
        defaults = ModelArgs(layers=1, hidden=2, heads=1, kv_heads=1, vocab=1)
        for key, ours in (("low_freq_factor", "rope_low_freq_factor"), ("high_freq_factor", "rope_high_freq_factor"),
                          ("original_max_position_embeddings", "rope_original_max_len")):
            if scaling[ours] != getattr(defaults, ours):
                _refuse(f"{field}.{key}", rope.get(key), f"plait supports Llama-3's value {getattr(defaults, ours)} only")
    elif rope_type != "default":
        _refuse(f"{field}.rope_type", rope_type, "plait implements plain rotary embeddings and Llama-3 scaling (\"llama3\") only")

    return ModelArgs(
        layers=config["num_hidden_layers"], hidden=hidden, heads=heads, kv_heads=kv_heads,
        vocab=config["vocab_size"], mlp="swiglu", ffn_hidden=config["intermediate_size"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), rope_theta=float(theta),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), init_std=float(config.get("initializer_range", 0.02)),
        **scaling,
    )


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a Hugging Face model directory (FileNotFoundError when absent)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: it has no {CONFIG_FILE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFConfigError(f"{path} is not valid JSON: {err}") from None


# ModelSection field -> ModelArgs attribute, for comparing a config's model with an HF one.
MODEL_FIELDS = (
    ("layers", "layers"), ("hidden", "hidden"), ("heads", "heads"), ("kv_heads", "kv_heads"),
    ("mlp", "mlp"), ("ffn_hidden", "ffn"), ("tie_embeddings", "tie_embeddings"), ("rope_theta", "rope_theta"),
    ("rope_scaling_factor", "rope_scaling_factor"), ("norm_eps", "norm_eps"),
)


def model_mismatches(ours: ModelArgs, theirs: ModelArgs, check_vocab: bool) -> list[tuple[str, Any, Any]]:
    """(model.<field>, our value, their value) for every field where the two models differ."""
    found = [(f"model.{key}", getattr(ours, attr), getattr(theirs, attr)) for key, attr in MODEL_FIELDS
             if getattr(ours, attr) != getattr(theirs, attr)]
    if check_vocab and ours.vocab != theirs.vocab:
        found.append(("model.vocab", ours.vocab, theirs.vocab))
    return found


def mismatch_message(spec: str, ours: ModelArgs, theirs: ModelArgs, check_vocab: bool) -> str | None:
    """Why a config's model cannot be initialised from `spec`'s, with the fix; None when they match."""
    wrong = model_mismatches(ours, theirs, check_vocab)
    if not wrong:
        return None
    listed = ", ".join(f"{key} = {a!r} but the model has {b!r}" for key, a, b in wrong)
    return (f"model.init_from = {spec!r} holds a different model: {listed}; set the model section to match: "
            + " ".join(model_overrides(theirs)))


def model_overrides(args: ModelArgs) -> list[str]:
    """The `--model.*` overrides that give a config exactly this model."""
    values = [(key, getattr(args, attr)) for key, attr in MODEL_FIELDS] + [("vocab", args.vocab)]
    return [f"--model.{key}={str(v).lower() if isinstance(v, bool) else v}" for key, v in values]
