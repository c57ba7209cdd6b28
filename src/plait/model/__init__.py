"""The network: a Llama-style decoder, its named sizes, and shape arithmetic.

Nothing here imports torch.distributed: parallelisms are applied from `plait.parallel`.
"""

from plait.model.flops import ParamCount, count_params, flops_per_token, matmul_params
from plait.model.llama import LayerCache, Transformer, build_model, init_weights, materialize
from plait.model.moe import MoE, moe_layers
from plait.model.sizes import NAMED_SIZES, ModelArgs

__all__ = [
    "NAMED_SIZES", "LayerCache", "MoE", "ModelArgs", "ParamCount", "moe_layers", "Transformer", "build_model",
    "count_params", "flops_per_token", "init_weights", "materialize", "matmul_params",
]

from plait.model.generate import generate  # noqa: E402

__all__ += ["generate"]
