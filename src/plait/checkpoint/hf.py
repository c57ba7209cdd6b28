"""Hugging Face Llama import and export: `plait convert --to-hf / --from-hf`, `model.init_from`.

Export streams: tensors are read from the checkpoint one at a time (`plait.checkpoint.
iter_model_tensors`, each assembled from the boxes the ranks saved), renamed, and written into output
shards of at most `shard_size` bytes, so the peak memory is about one output shard, never the
whole model. Import reads a Hugging Face directory's safetensors files (never a pickle: a
`pytorch_model.bin` is refused) and writes a plait run directory whose checkpoint `step_0` holds
the weights only. The name mapping and the config translation live in `hf_config` (no torch).

`transformers` is not imported here or anywhere in plait: the files are plain safetensors + JSON.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from plait.checkpoint import iter_model_tensors, read_manifest, save_model_tensors
from plait.checkpoint.sharded import check_shapes
from plait.checkpoint.hf_config import (
    HF_PREFIX,
    HFConfigError,
    args_from_hf_config,
    from_hf_name,
    hf_config_from_args,
    mismatch_message,
    model_overrides,
    read_hf_config,
    to_hf_name,
)
from plait.model.sizes import ModelArgs

Progress = Callable[[str], None]
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_SIZE = 5 * 10**9


def _quiet(_: str) -> None:
    pass


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_args(path: Path) -> tuple[ModelArgs, dict[str, Any]]:
    """The model a checkpoint was saved with, and its full resolved config (from its manifest)."""
    from plait.config import Config, apply_dict
    from plait.validation import resolve_model_args

    config = read_manifest(path).get("config") or {}
    if "model" not in config:
        raise HFConfigError(f"{path}/manifest.json holds no config; was it written by plait train?")
    cfg = apply_dict(Config(), {"model": config["model"]}, source=f"{path}/manifest.json")
    return resolve_model_args(cfg.model), config


def check_output_dir(out: Path, force: bool, src: Path) -> None:
    """Refuse to write into the source or into a non-empty directory (unless `force`)."""
    if out.resolve() == src.resolve():
        raise FileExistsError(f"output {out} is the source directory; pick a new directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output {out} exists and is not empty; pick a new directory or pass --force")


class _ShardWriter:
    """Collects tensors into files of at most `shard_size` bytes (a larger tensor gets its own),
    named model-0000i-of-0000N.safetensors with an index once N is known, or model.safetensors
    when one file holds everything (the two layouts `from_pretrained` reads)."""

    def __init__(self, out: Path, shard_size: int, progress: Progress) -> None:
        self.out, self.shard_size, self.progress = out, shard_size, progress
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_size:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.progress(f"  shard {len(self.files)}: {len(self.pending)} tensors, {_size(self.pending_bytes)}")
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            final = self.out / SINGLE_FILE
            self.files[0][0].replace(final)
            return [final]
        count = len(self.files)
        weight_map: dict[str, str] = {}
        written = []
        for i, (path, names) in enumerate(self.files, start=1):
            final = self.out / f"model-{i:05d}-of-{count:05d}.safetensors"
            path.replace(final)
            written.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return written


def _remove_previous_export(out: Path) -> None:
    """With --force: drop weight files of an earlier export, which could otherwise be mixed in."""
    for path in [*out.glob("model*.safetensors"), *out.glob(".shard-*.safetensors"), out / INDEX_FILE]:
        if path.is_file():
            path.unlink()


def _export_tokenizer(run_dir: Path, out: Path, max_len: int, progress: Progress) -> int | None:
    """Copy a run's tokenizer.json with a tokenizer_config.json; returns the end-of-text id.
    A byte-level run has no tokenizer.json and `transformers` no byte tokenizer: nothing is written."""
    meta_file = run_dir / "tokenizer_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    eos_id = meta.get("eos_id")
    if meta.get("plait_tokenizer") == "hf" and (run_dir / "tokenizer.json").is_file():
        shutil.copyfile(run_dir / "tokenizer.json", out / "tokenizer.json")
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                      "eos_token": meta.get("eos_token"), "clean_up_tokenization_spaces": False}
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        progress(f"  tokenizer: tokenizer.json ({meta.get('vocab_size')} tokens, end of text {meta.get('eos_token')!r})")
    elif meta.get("plait_tokenizer") == "byte":
        progress("  tokenizer: byte-level (UTF-8 bytes are the token ids); transformers has no such tokenizer, "
                 "so only the weights and config.json are written")
    else:
        progress(f"  tokenizer: none found in {run_dir}; only the weights and config.json are written")
    return eos_id


def export_to_hf(
    checkpoint: Path, out: Path, shard_size: int = DEFAULT_SHARD_SIZE, dtype: str | None = None,
    force: bool = False, progress: Progress = _quiet,
) -> list[Path]:
    """Write the checkpoint as a `transformers`-loadable Llama directory; returns the weight files.
    `dtype` ("float32", "bfloat16", "float16") casts the weights; None keeps the stored dtype."""
    checkpoint, out = Path(checkpoint), Path(out)
    args, config = checkpoint_args(checkpoint)
    seq_len = int(config.get("train", {}).get("seq_len", 2048))
    hf_config_from_args(args, seq_len, "float32")  # refuse (GELU, ...) before writing anything
    if shard_size < 1:
        raise HFConfigError(f"--shard-size = {shard_size} must be positive")
    if dtype is not None and dtype not in DTYPES:
        raise HFConfigError(f"--dtype = {dtype!r} is not one of {sorted(DTYPES)}")
    check_output_dir(out, force, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_export(out)
    progress(f"exporting {checkpoint} ({args.layers} layers x {args.hidden} hidden, vocab {args.vocab}) to {out}")

    writer = _ShardWriter(out, shard_size, progress)
    stored: torch.dtype | None = None
    for name, tensor in iter_model_tensors(checkpoint):
        if name == "output.weight" and args.tie_embeddings:
            continue  # transformers ties lm_head to embed_tokens itself
        stored = stored or tensor.dtype
        writer.add(to_hf_name(name), tensor.to(DTYPES[dtype]) if dtype else tensor)
    files = writer.finish()

    eos_id = _export_tokenizer(checkpoint.parent.parent, out, seq_len, progress)
    hf_config = hf_config_from_args(args, seq_len, dtype or _dtype_name(stored or torch.float32), eos_id)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    progress(f"wrote config.json and {len(files)} weight file(s), {_size(writer.total_bytes)}")
    return files


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory; refuses pickled weights."""
    if (hf_dir / INDEX_FILE).is_file():
        index = json.loads((hf_dir / INDEX_FILE).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{hf_dir}/{INDEX_FILE} names files that are not there: {missing[:3]}")
        return [hf_dir / n for n in names]
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE]
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise HFConfigError(
            f"{hf_dir} holds pickled PyTorch weights (*.bin/*.pt), which plait never unpickles; save the model "
            "with safetensors first (save_pretrained(..., safe_serialization=True))"
        )
    raise FileNotFoundError(f"{hf_dir} has no {SINGLE_FILE} or {INDEX_FILE}")


def read_hf_model(hf_dir: str | Path, progress: Progress = _quiet) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """The model of a Hugging Face Llama directory: its ModelArgs and its weights under plait's
    names, checked against the shapes the args imply."""
    from plait.model import build_model

    hf_dir = Path(hf_dir)
    args = args_from_hf_config(read_hf_config(hf_dir))
    tensors: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(hf_dir):
        progress(f"  reading {file.name}")
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                name = from_hf_name(hf_name)
                if name is not None:
                    tensors[name] = f.get_tensor(hf_name)
    if args.tie_embeddings and "embed.weight" in tensors:
        # plait's checkpoints hold both names of the tied matrix (separate storage: safetensors
        # refuses shared tensors); a tied export may or may not carry lm_head.weight.
        tensors["output.weight"] = tensors["embed.weight"].clone()
    shapes = {name: t.shape for name, t in build_model(args).state_dict().items()}  # meta: free
    check_shapes(str(hf_dir), {name: t.shape for name, t in tensors.items()}, shapes)
    return args, tensors


def _import_tokenizer(hf_dir: Path, out: Path, hf_config: dict[str, Any], vocab: int, progress: Progress) -> str:
    """Write the run's tokenizer files; returns the value for data.tokenizer."""
    from plait.data import ByteTokenizer, HFTokenizer, save_tokenizer

    if not (hf_dir / "tokenizer.json").is_file():
        save_tokenizer(ByteTokenizer(), out)
        progress(f"  tokenizer: {hf_dir} has no tokenizer.json; the run uses plait's byte tokenizer "
                 "(set data.tokenizer to the model's own tokenizer.json to train or sample with it)")
        return "byte"
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    eos = hf_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    eos_token = tok.id_to_token(eos) if isinstance(eos, int) else None
    wrapped = HFTokenizer(tok, name=f"hf:{hf_dir.name}", eos_token=eos_token, source=str(hf_dir / "tokenizer.json"))
    if wrapped.vocab_size > vocab:
        raise HFConfigError(
            f"{hf_dir}/tokenizer.json has {wrapped.vocab_size} tokens but config.json's vocab_size is {vocab}"
        )
    save_tokenizer(wrapped, out)
    progress(f"  tokenizer: tokenizer.json ({wrapped.vocab_size} tokens, end of text {wrapped.eos_token!r})")
    return str(out / "tokenizer.json")


def import_from_hf(hf_dir: str | Path, out: str | Path, force: bool = False, progress: Progress = _quiet) -> Path:
    """Write a plait run directory (config.toml, tokenizer, checkpoint step_0 with the weights and
    no optimizer state) from a Hugging Face Llama directory; returns the checkpoint's path."""
    from plait._version import __version__
    from plait.config import Config, set_value, to_toml
    from plait.validation import validate

    hf_dir, out = Path(hf_dir), Path(out)
    hf_config = read_hf_config(hf_dir)
    args_from_hf_config(hf_config)  # refuse unsupported configs before touching `out`
    check_output_dir(out, force, hf_dir)
    progress(f"importing {hf_dir} to {out}")
    args, tensors = read_hf_model(hf_dir, progress)
    if force and (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")  # an older import's steps would otherwise be resumed
    out.mkdir(parents=True, exist_ok=True)

    cfg = Config()
    for override in model_overrides(args):
        key, value = override.removeprefix("--").split("=", 1)
        set_value(cfg, key, value)
    set_value(cfg, "run.dir", str(out))
    set_value(cfg, "data.tokenizer", _import_tokenizer(hf_dir, out, hf_config, args.vocab or 0, progress))
    validate(cfg)
    header = f"# Imported from Hugging Face {hf_dir} by `plait convert --from-hf`; set data.* before training.\n\n"
    (out / "config.toml").write_text(header + to_toml(cfg.to_dict()))

    state = {"plait_version": __version__, "tokens_seen": 0, "world_size": 1, "loader": None,
             "config": cfg.to_dict(), "source": f"{HF_PREFIX}{hf_dir}"}
    path = save_model_tensors(out, 0, tensors, state)
    progress(f"wrote {path} ({len(tensors)} tensors, weights only) and {out / 'config.toml'}")
    return path


def init_model_from(model: nn.Module, spec: str) -> None:
    """`model.init_from`: copy a Hugging Face model's weights into the freshly materialised,
    not yet parallelised `model`, refusing (ConfigError) a model of another shape."""
    from plait.config import ConfigError

    if not spec.startswith(HF_PREFIX):
        raise ConfigError(f"model.init_from = {spec!r} must be of the form \"hf:DIR\"")
    try:
        theirs, tensors = read_hf_model(spec[len(HF_PREFIX):])
    except (HFConfigError, FileNotFoundError) as err:
        raise ConfigError(f"model.init_from = {spec!r}: {err}") from None
    problem = mismatch_message(spec, model.args, theirs, check_vocab=True)  # type: ignore[arg-type]
    if problem:
        raise ConfigError(problem)
    with torch.no_grad():
        model.load_state_dict(tensors)
