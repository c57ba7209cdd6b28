"""Packed fixed-length training sequences, a resumable data-parallel loader, and eval batches.

A split's token stream (documents joined by eos) is cut into windows of `seq_len + 1` tokens with
stride `seq_len`: window i covers tokens [i*seq_len, (i+1)*seq_len]; inputs are window[:-1] and
targets window[1:]. Training visits windows in a fresh random order each epoch. The order is a
function of (seed, epoch) only, and the loader's state is one global position, so a run resumes
exactly where it stopped, with any number of data-parallel ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from plait.config import ConfigError
from plait.data.shards import TokenArray


def _as_token_array(tokens: TokenArray | np.ndarray) -> TokenArray:
    return tokens if isinstance(tokens, TokenArray) else TokenArray([np.asarray(tokens)])


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many `seq_len + 1` windows with stride `seq_len` fit in `num_tokens` tokens."""
    return max(num_tokens - 1, 0) // seq_len


def epoch_permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one epoch: a permutation seeded by (seed, epoch) alone."""
    digest = hashlib.blake2b(f"plait-loader|{seed}|{epoch}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randperm(num_windows, generator=gen).numpy()


class TrainLoader:
    """This rank's share of each global batch of packed training windows.

    Step k's global batch is positions [k*G, (k+1)*G) of the concatenated epoch permutations
    (a batch may span an epoch boundary); rank r of D takes positions [r*G/D, (r+1)*G/D) of it.
    """

    def __init__(
        self,
        tokens: TokenArray | np.ndarray,
        seq_len: int,
        global_batch_sequences: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        seed: int = 0,
    ) -> None:
        if seq_len < 1 or global_batch_sequences < 1:
            raise ValueError(f"seq_len ({seq_len}) and global_batch_sequences ({global_batch_sequences}) must be positive")
        if dp_degree < 1 or not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank must be in [0, dp_degree), got rank {dp_rank} of {dp_degree}")
        if global_batch_sequences % dp_degree:
            raise ValueError(
                f"global_batch_sequences = {global_batch_sequences} is not divisible by the data-parallel "
                f"degree {dp_degree}; every rank must get the same number of sequences"
            )
        self.tokens = _as_token_array(tokens)
        self.seq_len = seq_len
        self.global_batch_sequences = global_batch_sequences
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.local_batch_sequences = global_batch_sequences // dp_degree
        self.seed = int(seed)
        self.num_windows = num_windows(len(self.tokens), seq_len)
        if self.num_windows == 0:
            raise ConfigError(
                f"the training split has {len(self.tokens)} tokens, fewer than train.seq_len + 1 = "
                f"{seq_len + 1}; lower train.seq_len or use a larger data.corpus"
            )
        self.sequences_consumed = 0
        # Permutations are rebuilt only when the epoch changes (at most two live per batch).
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next sequence comes from."""
        return self.sequences_consumed // self.num_windows

    @property
    def steps_consumed(self) -> int:
        return self.sequences_consumed // self.global_batch_sequences

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            perm = self._perms[epoch] = epoch_permutation(self.num_windows, self.seed, epoch)
        return perm

    def _window_indices(self, start: int, count: int) -> np.ndarray:
        """Window ids at global positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        pos, filled = start, 0
        while filled < count:
            epoch, offset = divmod(pos, self.num_windows)
            take = min(count - filled, self.num_windows - offset)
            out[filled : filled + take] = self._perm(epoch)[offset : offset + take]
            filled += take
            pos += take
        return out

    def next_batch(self) -> torch.Tensor:
        """This rank's (global_batch_sequences // dp_degree, seq_len + 1) int64 batch of the next step."""
        start = self.sequences_consumed + self.dp_rank * self.local_batch_sequences
        windows = self._window_indices(start, self.local_batch_sequences)
        rows = self.tokens.windows(windows * self.seq_len, self.seq_len + 1)
        self.sequences_consumed += self.global_batch_sequences
        return torch.from_numpy(rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The global position and what it depends on; no rank or layout, so any layout resumes."""
        return {
            "sequences_consumed": self.sequences_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved `state` stopped."""
        if int(state["seq_len"]) != self.seq_len:
            raise ConfigError(
                f"train.seq_len = {self.seq_len} but the checkpoint's data loader used {state['seq_len']}; "
                "resume with the same train.seq_len or start a new run"
            )
        if int(state["num_windows"]) != self.num_windows:
            raise ConfigError(
                f"the training split now has {self.num_windows} windows of train.seq_len = {self.seq_len}, "
                f"but the checkpoint's had {state['num_windows']}: data.corpus, data.tokenizer or "
                "data.val_fraction changed; resume with the same data settings or start a new run"
            )
        consumed = int(state["sequences_consumed"])
        if consumed < 0:
            raise ValueError(f"sequences_consumed must be >= 0, got {consumed}")
        self.seed = int(state["seed"])
        self.sequences_consumed = consumed
        self._perms = {}


def iter_eval_batches(
    tokens: TokenArray | np.ndarray, seq_len: int, batch_sequences: int, num_batches: int
) -> Iterator[torch.Tensor]:
    """The first `num_batches * batch_sequences` windows of a split, in order (fewer if short)."""
    if batch_sequences < 1 or num_batches < 0:
        raise ValueError(f"batch_sequences ({batch_sequences}) must be positive and num_batches ({num_batches}) >= 0")
    arr = _as_token_array(tokens)
    available = num_windows(len(arr), seq_len)
    if available == 0:
        raise ConfigError(
            f"the validation split has {len(arr)} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; "
            "raise data.val_fraction (or use a larger data.corpus) or lower train.seq_len"
        )
    total = min(available, num_batches * batch_sequences)
    for first in range(0, total, batch_sequences):
        ids = np.arange(first, min(first + batch_sequences, total), dtype=np.int64)
        yield torch.from_numpy(arr.windows(ids * seq_len, seq_len + 1))
