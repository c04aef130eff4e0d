"""Data parallel runs under ``torchrun``: process group, sharding, exact merges, rank-0-only output.

``torchrun --nproc-per-node N -m normgrowth report ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in their environment. :func:`world` joins the process group
on first use (NCCL for CUDA tensors, each process on ``cuda:LOCAL_RANK``; gloo for CPU tensors).
Collection shards the data into contiguous blocks of whole batches (:func:`shard_batches`), so every
rank runs the very batches a single process would; the accumulators are then gathered and merged in
rank order (:meth:`normgrowth.stats.TokenStats.merge_`) on every rank, and only rank 0 writes files and
prints. Without ``WORLD_SIZE`` > 1 every function here is the single-process identity.
"""

from __future__ import annotations

import os
from typing import Any, Optional

def launched() -> bool:
    """True under a launcher (torchrun) that started more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def world() -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group on the first call under torchrun."""
    if not launched():
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL for CUDA tensors, gloo for CPU ones (a run with --device cpu)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    """This process's rank (0 without torchrun), without joining the process group."""
    if not launched():
        return 0
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in the one process that writes files and prints (rank 0)."""
    return rank() == 0


def check_device_map(device_map: Optional[str]) -> None:
    """``--device-map`` spreads one model over every visible GPU of a node, so under torchrun it needs
    one process per node; raise a one-line error otherwise."""
    if device_map and launched() and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        from .errors import NormgrowthError

        raise NormgrowthError("--device-map spreads each process's model over all GPUs of its node: run torchrun "
                              "with --nproc-per-node 1 (one process per node) or drop --device-map.")


def shard_batches(n_items: int, batch_size: int, rank_: int, world_size: int) -> tuple[int, int]:
    """Items ``[lo, hi)`` of rank ``rank_``: the batches ``ceil(n_items / batch_size)`` split into
    ``world_size`` contiguous blocks whose sizes differ by at most one batch (earlier ranks take the extra)."""
    n_batches = -(-n_items // batch_size)
    per, extra = divmod(n_batches, world_size)
    first = rank_ * per + min(rank_, extra)
    count = per + (1 if rank_ < extra else 0)
    return min(n_items, first * batch_size), min(n_items, (first + count) * batch_size)


def _group_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if world()[1] == 1:
        return [obj]
    return _group_objects(obj)


def agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (for decisions that must be the same everywhere, such as
    whether a cached result is used)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_all(error: Optional[BaseException]) -> None:
    """Collective: re-raise this rank's ``error``, or when another rank failed, raise one line naming it,
    so that no rank waits forever in a later collective."""
    from .errors import NormgrowthError

    def describe(err: BaseException) -> str:
        text = str(err).splitlines()[0] if str(err) else ""
        if isinstance(err, NormgrowthError):
            return text
        return f"{type(err).__name__}: {text}".rstrip(": ") + " (see that rank's output)."

    failures = all_gather(None if error is None else describe(error))
    if error is not None:
        raise error
    for r, failure in enumerate(failures):
        if failure is not None:
            raise NormgrowthError(f"rank {r}: {failure}")


def raise_on_any_rank(error: Optional[BaseException], world_size: int) -> None:
    """After a rank's share of work: raise ``error`` here, or under torchrun (``world_size > 1``) on every
    rank when any rank failed (:func:`check_all`)."""
    if world_size > 1:
        check_all(error)
    elif error is not None:
        raise error


def merge_token_stats(stats: Any) -> None:
    """Replace this rank's :class:`~normgrowth.stats.TokenStats` by the merge of every rank's, in rank
    order (the same numbers on every rank). Histogram counts are summed with one all-reduce; the rest
    travels as numpy state."""
    if world()[1] == 1:
        return
    import torch
    import torch.distributed as dist

    hist = stats.hist
    dist.all_reduce(hist, op=dist.ReduceOp.SUM)  # int64: exact in any order
    state = stats.state_dict()
    state.pop("hist")
    states = _group_objects(state)
    merged = None
    for r, st in enumerate(states):
        part = type(stats)(stats.k, stats.n_positions, stats.device, hist_series=0, log_series=stats.n_log)
        part.load_state_dict({**st, "hist": part.hist.cpu().numpy()})
        if merged is None:
            merged = part
        else:
            merged.merge_(part)
    with torch.no_grad():
        stats.load_state_dict({**merged.state_dict(), "hist": hist.cpu().numpy()})


def sum_over_ranks(array: Any, count: int) -> tuple[Any, int]:
    """Every rank's float64 ``array`` and integer ``count`` summed in rank order (the same on every rank);
    ``(array, count)`` in a single process."""
    if world()[1] == 1:
        return array, count
    parts = _group_objects((array, int(count)))
    total = parts[0][0].copy()
    for arr, _ in parts[1:]:
        total += arr
    return total, sum(n for _, n in parts)


def gather_rows(arrays: list) -> list:
    """Each array's rows from every rank, concatenated in rank order (each rank holds a contiguous block of
    sequences, :func:`shard_batches`); the arrays themselves in a single process."""
    if world()[1] == 1:
        return list(arrays)
    import numpy as np

    parts = _group_objects(list(arrays))
    return [np.concatenate([p[i] for p in parts], 0) for i in range(len(arrays))]


def max_over_ranks(value: float) -> float:
    """The largest of every rank's ``value``."""
    return float(max(all_gather(float(value))))


def close() -> None:
    """Leave the process group (at the end of a torchrun command)."""
    if not launched():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
