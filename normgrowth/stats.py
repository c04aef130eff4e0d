"""Streaming per-token statistics with O(1) memory in the number of tokens (pure tensor code).

A *series* is one scalar per token (e.g. ``||resid_post_5||``). :class:`TokenStats` tracks ``K`` series
at once from batches of values ``[K, batch, pos]`` and a validity mask ``[batch, pos]``:

* main statistics over valid tokens at positions >= 1: count, mean and Welford M2 (merged per batch
  with Chan et al.'s formula), mean of log(value), and a fixed log-spaced histogram for quantiles;
* the same count / mean / M2 at position 0 ("bos"), kept apart;
* a per-position mean curve (all positions, position 0 included);
* per-sequence means over each sequence's valid positions >= 1 (``[n_seqs, K]``, kept on the CPU),
  which the fitters bootstrap over. This is the only part that grows with the data: 4 K bytes per
  sequence, in one array allocated once (``expected_sequences``) or grown by doubling. Appending a
  small array per batch instead left long-lived blocks scattered over glibc's heap between the
  freed activations, and the process's resident memory grew with the number of sequences.

Accumulators are float64 and live on the device of the values; the caller synchronises once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Histogram: HIST_BINS log10-spaced bins over [10**HIST_LOG10_MIN, 10**HIST_LOG10_MAX]; values outside
# are clamped into the first/last bin. 400 bins per decade: relative bin width 0.58 %.
HIST_LOG10_MIN = -8.0
HIST_LOG10_MAX = 12.0
HIST_BINS = 8000
UPDATE_CHUNK_ELEMENTS = 2**20  # values per chunk of series in TokenStats.update (bounds float64 temporaries)


class RowTable:
    """Rows of shape ``row_shape`` appended batch by batch into one preallocated array (doubling on overflow)."""

    def __init__(self, row_shape: tuple[int, ...], dtype: type, capacity: int = 0):
        self.n = 0
        self._rows = np.zeros((max(int(capacity), 1), *row_shape), dtype)

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self._rows):
            grown = np.zeros((max(need, 2 * len(self._rows)),) + self._rows.shape[1:], self._rows.dtype)
            grown[: self.n] = self._rows[: self.n]
            self._rows = grown
        self._rows[self.n: need] = rows
        self.n = need

    def values(self) -> np.ndarray:
        """A copy of the rows appended so far."""
        return self._rows[: self.n].copy()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"rows": self.values()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        rows = np.asarray(state["rows"])
        if rows.shape[1:] != self._rows.shape[1:]:
            raise ValueError(f"row shape {rows.shape[1:]} does not match {self._rows.shape[1:]}")
        self.n = 0
        self.append(rows.astype(self._rows.dtype, copy=False))

    def merge_(self, other: "RowTable") -> None:
        """Append ``other``'s rows after these (the caller orders the tables)."""
        self.append(other._rows[: other.n])


@dataclass
class Moments:
    """count, mean and M2 = sum((x - mean)^2) for each of K series (float64)."""

    count: torch.Tensor  # [] or [K]
    mean: torch.Tensor  # [K]
    m2: torch.Tensor  # [K]

    @staticmethod
    def zeros(k: int, device: torch.device) -> "Moments":
        z = torch.zeros(k, dtype=torch.float64, device=device)
        return Moments(torch.zeros((), dtype=torch.float64, device=device), z.clone(), z.clone())

    def merge_batch(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Merge values [K, N] where mask [N] (bool) is True: Chan et al. parallel update.

        n = n_a + n_b; mean = mean_a + d n_b / n; M2 = M2_a + M2_b + d^2 n_a n_b / n, d = mean_b - mean_a.
        """
        n_b = mask.to(torch.float64).sum()
        self.merge_rows(0, values.shape[0], values, mask, n_b)
        self.count += n_b  # in place: no new long-lived object per batch

    def merge_rows(self, lo: int, hi: int, values: torch.Tensor, mask: torch.Tensor, n_b: torch.Tensor) -> None:
        """:meth:`merge_batch` for series ``lo:hi`` only (values [hi - lo, N]); the count is not advanced:
        the caller adds ``n_b`` to it once all rows of the batch are merged."""
        zero = torch.zeros((), dtype=torch.float64, device=values.device)
        v = torch.where(mask, values.to(torch.float64), zero)  # padding may hold inf/NaN: never used
        mean_b = v.sum(-1) / n_b.clamp(min=1)
        m2_b = torch.where(mask, (v - mean_b[:, None]) ** 2, zero).sum(-1)
        n = self.count + n_b
        mean_a = self.mean[lo:hi]
        delta = mean_b - mean_a
        safe_n = n.clamp(min=1)
        self.mean[lo:hi] = mean_a + delta * n_b / safe_n
        self.m2[lo:hi] = self.m2[lo:hi] + m2_b + delta**2 * self.count * n_b / safe_n

    def variance(self) -> torch.Tensor:
        """Population variance M2 / n (the spread of the per-token values)."""
        return self.m2 / self.count.clamp(min=1)

    def merge_(self, other: "Moments") -> None:
        """Fold another accumulator of the same K series into this one (Chan et al., exact in exact
        arithmetic): n = n_a + n_b, d = mean_b - mean_a, mean = mean_a + d n_b / n,
        M2 = M2_a + M2_b + d^2 n_a n_b / n."""
        n_b = other.count.to(self.count.device)
        mean_b, m2_b = other.mean.to(self.mean.device), other.m2.to(self.m2.device)
        n = self.count + n_b
        delta = mean_b - self.mean
        safe_n = n.clamp(min=1)
        self.mean += delta * n_b / safe_n
        self.m2 += m2_b + delta**2 * self.count * n_b / safe_n
        self.count += n_b

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"count": self.count.cpu().numpy(), "mean": self.mean.cpu().numpy(), "m2": self.m2.cpu().numpy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name in ("count", "mean", "m2"):
            _load_into(getattr(self, name), state[name], name)


class TokenStats:
    """Streaming statistics of K per-token series; see the module docstring."""

    def __init__(self, n_series: int, n_positions: int, device: torch.device, hist_series: int = 0,
                 log_series: int = 0, expected_sequences: int = 0):
        """``hist_series``/``log_series``: the first that many series also get a histogram / log-mean;
        ``expected_sequences``: room reserved for per-sequence means (more still fit)."""
        self.k, self.n_positions, self.device = n_series, n_positions, device
        self.main = Moments.zeros(n_series, device)
        self.bos = Moments.zeros(n_series, device)
        self.log_sum = torch.zeros(log_series, dtype=torch.float64, device=device)
        self.n_log = log_series
        self.n_hist = hist_series
        self.hist = torch.zeros(hist_series * HIST_BINS, dtype=torch.int64, device=device)
        self.pos_sum = torch.zeros(n_series, n_positions, dtype=torch.float64, device=device)
        self.pos_count = torch.zeros(n_positions, dtype=torch.float64, device=device)
        self._seq_means = RowTable((n_series,), np.float32, expected_sequences)
        self._seq_counts = RowTable((), np.int64, expected_sequences)
        self.first_sequence = 0  # global index of this accumulator's first sequence (data-parallel shards)

    def update(self, values: torch.Tensor, valid: torch.Tensor) -> None:
        """values [K, b, p] (float32), valid [b, p] (bool: real token, not padding).

        Series are processed in chunks of about UPDATE_CHUNK_ELEMENTS values, which bounds the float64
        temporaries whatever K and the batch are (every statistic is per series, so chunking changes
        no arithmetic).
        """
        k, b, p = values.shape
        rest = valid.clone()
        rest[:, 0] = False
        rest_flat = rest.reshape(-1)
        bos_valid = valid[:, 0]
        n_main = rest_flat.to(torch.float64).sum()
        n_bos = bos_valid.to(torch.float64).sum()
        rest64 = rest.to(torch.float64)
        seq_count = rest64.sum(1)  # [b]
        zero = torch.zeros((), dtype=torch.float64, device=values.device)
        step = max(1, UPDATE_CHUNK_ELEMENTS // max(b * p, 1))
        seq_means = []
        for lo in range(0, k, step):
            hi = min(k, lo + step)
            chunk = values[lo:hi]
            self.main.merge_rows(lo, hi, chunk.reshape(hi - lo, b * p), rest_flat, n_main)
            self.bos.merge_rows(lo, hi, chunk[:, :, 0], bos_valid, n_bos)
            v64 = torch.where(valid[None], chunk.to(torch.float64), zero)
            self.pos_sum[lo:hi, :p] += v64.sum(1)
            if lo < self.n_log:
                top = min(hi, self.n_log)
                logs = torch.log(values[lo:top].reshape(top - lo, -1).to(torch.float64).clamp(min=1e-300))
                self.log_sum[lo:top] += torch.where(rest_flat, logs, zero).sum(-1)
            if lo < self.n_hist:
                top = min(hi, self.n_hist)
                self.hist[lo * HIST_BINS:top * HIST_BINS] += histogram_counts(
                    values[lo:top].reshape(top - lo, -1)[:, rest_flat])
            # per-sequence means over positions >= 1
            seq_means.append(((v64 * rest64[None]).sum(-1) / seq_count.clamp(min=1)).T)  # [b, hi - lo]
        self.main.count += n_main  # in place: no new long-lived object per batch
        self.bos.count += n_bos
        self.pos_count[:p] += valid.to(torch.float64).sum(0)
        # one small device->host copy per batch
        self._seq_means.append(torch.cat(seq_means, 1).float().cpu().numpy())
        self._seq_counts.append(seq_count.cpu().numpy().astype(np.int64))

    # ----- state: checkpoints and data-parallel merges ---------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Every accumulator as numpy arrays (float64 sums and moments copied exactly)."""
        state = {"first_sequence": np.int64(self.first_sequence), "log_sum": self.log_sum.cpu().numpy(),
                 "hist": self.hist.cpu().numpy(), "pos_sum": self.pos_sum.cpu().numpy(),
                 "pos_count": self.pos_count.cpu().numpy(), "seq_means": self._seq_means.values(),
                 "seq_counts": self._seq_counts.values()}
        for prefix, moments in (("main", self.main), ("bos", self.bos)):
            state.update({f"{prefix}.{k}": v for k, v in moments.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s arrays (shapes must match this accumulator's)."""
        for prefix, moments in (("main", self.main), ("bos", self.bos)):
            moments.load_state_dict({k: state[f"{prefix}.{k}"] for k in ("count", "mean", "m2")})
        for name in ("log_sum", "hist", "pos_sum", "pos_count"):
            _load_into(getattr(self, name), state[name], name)
        self._seq_means.load_state_dict({"rows": state["seq_means"]})
        self._seq_counts.load_state_dict({"rows": state["seq_counts"]})
        self.first_sequence = int(state["first_sequence"])

    def merge_(self, other: "TokenStats") -> None:
        """Fold the statistics of an adjacent block of sequences into these: moments by Chan's formula,
        sums and histogram counts added, per-sequence rows placed by global sequence index
        (``first_sequence``), so the merged tables are in the original order whatever the merge order."""
        mine, theirs = (self.first_sequence, self.n_sequences), (other.first_sequence, other.n_sequences)
        if other.n_sequences and self.n_sequences and other.first_sequence == mine[0] + mine[1]:
            before = False
        elif other.n_sequences and self.n_sequences and self.first_sequence == theirs[0] + theirs[1]:
            before = True
        elif other.n_sequences == 0 or self.n_sequences == 0:
            before = self.n_sequences == 0
        else:
            raise ValueError(f"sequence blocks {mine} and {theirs} (first, count) are not adjacent")
        self.main.merge_(other.main)
        self.bos.merge_(other.bos)
        self.log_sum += other.log_sum.to(self.device)
        self.hist += other.hist.to(self.device)
        self.pos_sum += other.pos_sum.to(self.device)
        self.pos_count += other.pos_count.to(self.device)
        if before:  # other's block comes first: rebuild the tables as other's rows, then these
            self._seq_means = _joined(other._seq_means, self._seq_means)
            self._seq_counts = _joined(other._seq_counts, self._seq_counts)
            self.first_sequence = other.first_sequence
        else:
            self._seq_means.merge_(other._seq_means)
            self._seq_counts.merge_(other._seq_counts)

    @property
    def n_sequences(self) -> int:
        return self._seq_counts.n

    # ----- read-out (numpy) -----------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.main.count.item())

    @property
    def bos_count(self) -> int:
        return int(self.bos.count.item())

    def seq_means(self) -> np.ndarray:
        return self._seq_means.values()

    def seq_counts(self) -> np.ndarray:
        return self._seq_counts.values()

    def position_mean(self) -> np.ndarray:
        return (self.pos_sum / self.pos_count.clamp(min=1)).cpu().numpy()

    def hist_counts(self) -> np.ndarray:
        return self.hist.reshape(self.n_hist, HIST_BINS).cpu().numpy()

    def log_mean(self) -> np.ndarray:
        return (self.log_sum / self.main.count.clamp(min=1)).cpu().numpy()


def _joined(first: RowTable, second: RowTable) -> RowTable:
    """A new table holding ``first``'s rows, then ``second``'s."""
    rows = first._rows
    out = RowTable(rows.shape[1:], rows.dtype, first.n + second.n)
    out.merge_(first)
    out.merge_(second)
    return out


def _load_into(target: torch.Tensor, value: np.ndarray, name: str) -> None:
    """Copy saved ``value`` into the accumulator tensor ``target`` (same shape) in place."""
    value = torch.as_tensor(np.asarray(value))
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"saved {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    target.copy_(value.to(target.dtype))


def histogram_counts(values: torch.Tensor) -> torch.Tensor:
    """Counts of values [K, N] in HIST_BINS log10-spaced bins per series, flattened to [K * HIST_BINS]."""
    k = values.shape[0]
    width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
    idx = ((torch.log10(values.to(torch.float64).clamp(min=1e-300)) - HIST_LOG10_MIN) / width).floor()
    idx = idx.clamp(0, HIST_BINS - 1).long()
    idx = idx + torch.arange(k, device=values.device)[:, None] * HIST_BINS
    return torch.bincount(idx.reshape(-1), minlength=k * HIST_BINS)


def hist_quantile(counts: np.ndarray, q: float) -> np.ndarray:
    """Quantile q of each row of histogram counts [K, HIST_BINS], interpolating log-linearly inside a bin.

    Exact up to the bin width (0.58 % relative); NaN for an empty row.
    """
    counts = np.atleast_2d(counts).astype(np.float64)
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1]
    out = np.full(counts.shape[0], np.nan)
    width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
    for i in range(counts.shape[0]):
        if total[i] <= 0:
            continue
        target = q * total[i]
        j = int(np.searchsorted(cum[i], target, side="left"))
        j = min(j, HIST_BINS - 1)
        below = cum[i, j - 1] if j > 0 else 0.0
        frac = (target - below) / counts[i, j] if counts[i, j] > 0 else 0.5
        out[i] = 10.0 ** (HIST_LOG10_MIN + (j + min(max(frac, 0.0), 1.0)) * width)
    return out
