"""On a CUDA device: `model.init_from` loads a Hugging Face model into a model materialised on the
GPU, and a checkpoint written by a GPU run exports to a Llama that `transformers` runs the same.

Skipped where no CUDA device is present (every CI run); run with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import plait
from plait.cli import main
from plait.validation import build_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-5, max_position_embeddings=256)
OVERRIDES = ["--model.layers=2", "--model.hidden=64", "--model.heads=4", "--model.kv_heads=2",
             "--model.ffn_hidden=96", "--model.vocab=300", "--model.norm_eps=1e-5", "--model.rope_theta=10000",
             "--train.seq_len=32", "--train.global_batch_tokens=256", "--train.micro_batch_size=8",
             "--train.eval_every=0", "--train.sample_tokens=0", "--run.progress=none", "--run.tensorboard=false",
             "--optim.weight_decay=0", "--optim.warmup_steps=0", "--train.device=cuda"]


def _hf_model(tmp_path: Path) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def _corpus(tmp_path: Path) -> str:
    (tmp_path / "corpus.txt").write_text("def add(a, b):\n    return a + b\n\n" * 400)
    return str(tmp_path / "corpus.txt")


def _max_diff(ours: torch.nn.Module, theirs: LlamaForCausalLM) -> float:
    """Both on the CPU in fp32, so the kernels are the same as in the unit tests."""
    tokens = torch.randint(0, 300, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours.float().cpu().eval()(tokens) - theirs(tokens).logits).abs().max().item()


def test_init_from_on_cuda(tmp_path):
    theirs, hf_dir = _hf_model(tmp_path)
    # bf16 autocast (the GPU default) for one step at a negligible learning rate.
    cfg = build_config(None, OVERRIDES + [f"--model.init_from=hf:{hf_dir}", f"--data.corpus={_corpus(tmp_path)}",
                                          "--train.steps=1", "--optim.lr=1e-12", f"--run.dir={tmp_path / 'run'}"])
    result = plait.train(cfg)
    assert next(result.model.parameters()).device.type == "cuda"
    assert _max_diff(result.model, theirs) <= 1e-5


def test_export_of_a_cuda_run(tmp_path):
    cfg = build_config(None, OVERRIDES + [f"--data.corpus={_corpus(tmp_path)}", "--train.steps=3",
                                          f"--run.dir={tmp_path / 'run'}"])
    plait.train(cfg)
    assert main(["convert", "--to-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype=float32"]) == 0
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert _max_diff(plait.load(tmp_path / "run").model, theirs) <= 1e-5
