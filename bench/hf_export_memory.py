"""Peak memory of `plait convert --to-hf`: does export hold one shard or the whole model?

Saves a random model as a plait checkpoint, then exports it in a fresh process per shard size and
reads that process's peak resident set (/proc/self/status VmHWM, Linux; it counts file pages the
process mapped, too) before and after the export. Prints a table and writes JSON (default bench/out/hf_export_memory.json).

    python bench/hf_export_memory.py [--model 125m] [--shard-sizes 50MB,5GB] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from plait.checkpoint import save_model_tensors
from plait.parallel.gather import gather_model
from plait.cli import parse_size
from plait.config import Config
from plait.model import NAMED_SIZES, build_model, materialize
from plait.trainer.record import resolved_config

CHILD = """
import json, sys
from pathlib import Path
from plait.checkpoint.hf import export_to_hf
def peak():
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's from before exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
before = peak()
export_to_hf(Path(sys.argv[1]), Path(sys.argv[2]), shard_size=int(sys.argv[3]), force=True)
print(json.dumps({"peak_before": before, "peak_after": peak()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="125m", choices=list(NAMED_SIZES))
    parser.add_argument("--shard-sizes", default="50MB,5GB")
    parser.add_argument("--out", default="bench/out/hf_export_memory.json")
    opts = parser.parse_args()

    args = NAMED_SIZES[opts.model].replace(tie_embeddings=False)
    if args.vocab is None:
        args = args.replace(vocab=256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = materialize(build_model(args), "cpu", 0)
        tensors = gather_model(model, False)
        model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        state = {"config": resolved_config(Config(), args).to_dict(), "tokens_seen": 0, "loader": None}
        step = save_model_tensors(Path(tmp) / "run", 1, tensors, state)
        del model, tensors
        for text in opts.shard_sizes.split(","):
            size = parse_size(text)
            done = subprocess.run([sys.executable, "-c", CHILD, str(step), str(Path(tmp) / "hf"), str(size)],
                                  check=True, capture_output=True, text=True)
            peaks = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"shard_size": size, "model_bytes": model_bytes, **peaks,
                         "export_peak_growth": peaks["peak_after"] - peaks["peak_before"]})

    print(f"{opts.model} (untied), {model_bytes / 1e9:.2f} GB of fp32 weights")
    print(f"{'shard size':>12} {'peak before':>12} {'peak after':>12} {'growth':>10} {'growth/model':>13}")
    for r in rows:
        print(f"{r['shard_size'] / 1e6:>10.0f}MB {r['peak_before'] / 1e9:>10.2f}GB {r['peak_after'] / 1e9:>10.2f}GB "
              f"{r['export_peak_growth'] / 1e9:>8.2f}GB {r['export_peak_growth'] / r['model_bytes']:>13.2f}")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": opts.model, "torch": torch.__version__, "machine": platform.machine(),
                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
