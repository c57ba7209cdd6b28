"""The network: a Llama-style decoder, its named sizes, and shape arithmetic.

Nothing here imports torch.distributed: parallelisms are applied from `plait.parallel`. The shape
arithmetic (`sizes`, `flops`) is pure Python and imported at once; the torch modules (the
network, MoE, generation) load on first use, so that the planner, which needs only the shapes,
answers without importing torch.
"""

import importlib
from typing import Any

from plait.model.flops import ParamCount, count_params, flops_per_token, matmul_params
from plait.model.sizes import NAMED_SIZES, ModelArgs

_LAZY = {
    "LayerCache": "plait.model.llama", "Transformer": "plait.model.llama", "build_model": "plait.model.llama",
    "init_weights": "plait.model.llama", "materialize": "plait.model.llama",
    "MoE": "plait.model.moe", "moe_layers": "plait.model.moe", "generate": "plait.model.generate",
}

__all__ = [
    "NAMED_SIZES", "LayerCache", "MoE", "ModelArgs", "ParamCount", "moe_layers", "Transformer", "build_model",
    "count_params", "flops_per_token", "init_weights", "materialize", "matmul_params", "generate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'plait.model' has no attribute {name!r}")
