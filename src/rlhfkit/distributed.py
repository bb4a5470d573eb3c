"""Data parallelism across processes started by ``torchrun`` or ``accelerate launch`` (issue #9).

Nothing here is a distributed engine: accelerate reads the launcher's environment and opens
the process group (gloo on CPUs, NCCL on GPUs); we only decide who does which examples and
sum gradients. Every rank takes a contiguous shard of each global batch, back-propagates the
*sum* of its per-unit losses (units: tokens or examples, as the loss says), and the summed
gradients are divided by the global number of units, so the update equals the 1-process one
with the same global batch, up to float summation order. Rank 0 alone writes files.
Sharding the model over the processes instead of replicating it is ``rlhfkit.fsdp``.
"""

from __future__ import annotations

import datetime
import gc
import os

import torch



def truthy(value: str | None) -> bool:
    """Whether a launcher's setting (an environment variable, a config value) says yes."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes logs, checkpoints and the final model."""
    return rank() == 0


def setup(device: torch.device, timeout_s: int = 1800) -> torch.device:
    """Open the process group when launched with more than one process; returns this rank's device
    (``cuda`` becomes ``cuda:LOCAL_RANK``). ``timeout_s``: how long a collective waits for the other processes
    (NCCL's own default is 10 minutes, shorter than process 0 may take to save a large model alone)."""
    if world_size() == 1:
        return device
    from accelerate import PartialState

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and local >= torch.cuda.device_count():
        raise ValueError(f"process {rank()} (local rank {local}) has no GPU of its own: this machine shows "
                           f"{torch.cuda.device_count()}; launch at most that many processes a machine, or pass "
                           "--train.device cpu")
    # reads RANK / WORLD_SIZE / MASTER_ADDR, inits the group once
    PartialState(cpu=device.type == "cpu", timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


def shard_range(n: int, n_ranks: int | None = None, index: int | None = None) -> range:
    """This rank's contiguous share of ``range(n)`` (sizes differ by at most one, earlier ranks larger)."""
    n_ranks = world_size() if n_ranks is None else n_ranks
    index = rank() if index is None else index
    size, extra = divmod(n, n_ranks)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def shard(items, n_ranks: int | None = None, index: int | None = None):
    """This rank's contiguous share of a list or tensor."""
    span = shard_range(len(items), n_ranks, index)
    return items[span.start: span.stop]


def micro_splits(n: int, whole: int, micro: int) -> list[tuple[slice, bool]]:
    """This process's ``n`` rows of a mini-batch of ``whole`` rows (over every process) cut into micro-batches of
    at most ``micro`` rows (0: one micro-batch), near-equal and contiguous, as many in every process: ceil(largest
    share / ``micro``), since a sharded model's forwards and backwards are collective. Each is (rows, real); where
    a process has fewer rows than micro-batches, the spare ones are its first row again, marked not real (weigh
    it 0)."""
    largest = len(shard_range(whole, index=0))  # process 0's share, the largest
    count = -(-largest // micro) if micro else 1
    size, extra = divmod(n, count)
    splits, start = [], 0
    for j in range(count):
        stop = start + size + (j < extra)
        splits.append((slice(start, stop), True) if stop > start else (slice(0, 1), False))
        start = stop
    return splits


def check_shares(buffer: int, mini_batch: int, source: str = "", rows: int = 0, **batches: int) -> None:
    """Refuse a split that leaves a process without rows, naming the setting: each of ``batches`` (setting →
    rows, split over the processes) and each mini-batch a ``buffer`` of rows is cut into (``mini_batch``
    rows, the last one what is left). ``source`` (a prompts file of ``rows`` usable rows) is named when the
    batch is the whole file. Nothing with one process."""
    from rlhfkit.config import ConfigError

    world = world_size()
    for name, n in {**batches, "mini_batch_size": min(mini_batch, buffer)}.items():
        if n < world:
            where = f" ({source} holds {rows} usable prompts)" if source and rows < world else ""
            raise ConfigError(f"{name} {n}{where} leaves some of the {world} processes without rows (each takes a "
                              f"share of it): make it at least {world}")
    last = buffer % mini_batch
    if 0 < last < world:
        raise ConfigError(f"mini_batch_size {mini_batch} cuts the {buffer} samples of a step into mini-batches whose "
                          f"last holds {last}, fewer than the {world} processes: choose a mini_batch_size that "
                          f"divides {buffer}, or leaves at least {world}")


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process). Tensors inside should be on
    the CPU: they arrive on the device they were sent from."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (identity with one process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over ranks (every process calls it; the identity with one)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds in any process (every process calls it; the identity with one)."""
    if world_size() == 1:
        return flag
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return all_sum([float(flag)], device)[0] > 0


def sum_over_processes(weighted: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value summed over processes (identity with one). Pass each process's metric times its share of
    the whole (its tokens over the mini-batch's): the sum is the metric of the whole mini-batch."""
    return dict(zip(weighted, all_sum(list(weighted.values()), device)))


BUCKET_ELEMENTS = 2**24  # ~64 MB of fp32 per collective: few calls, and no full copy of a large model's gradients


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of ``tensors`` of about ``limit`` elements (a larger tensor goes alone)."""
    groups, current, size = [], [], 0
    for t in tensors:
        if current and size + t.numel() > limit:
            groups.append(current)
            current, size = [], 0
        current.append(t)
        size += t.numel()
    return groups + [current] if current else groups


def is_shard(t) -> bool:
    """Whether ``t`` is an FSDP shard (a DTensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5: nothing is sharded
        return False
    return isinstance(t, DTensor)


def average_gradients(params, total_weight: float) -> None:
    """Sum each gradient over ranks, then divide by ``total_weight`` (the global units behind it).

    Sharded parameters (``rlhfkit.fsdp``) arrive summed already, by FSDP's reduce-scatter in the
    backward: only their shards are divided."""
    params = list(params)
    sharded = [p for p in params if is_shard(p)] if world_size() > 1 else []  # one process shards nothing
    replicated = [p for p in params if not sharded or not is_shard(p)]
    if world_size() > 1:  # every rank sends every tensor, in the same order, even one it has no gradient for
        for p in replicated:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    grads = [p.grad for p in replicated if p.grad is not None]
    if world_size() > 1:
        for bucket in _buckets(grads, BUCKET_ELEMENTS):
            flat = torch.cat([g.reshape(-1) for g in bucket])  # one collective per bucket, not per tensor
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
    grads += [p.grad.to_local() for p in sharded if p.grad is not None]  # views of this process's shards
    if grads and total_weight != 1.0:
        torch._foreach_div_(grads, max(total_weight, 1e-12))


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def teardown() -> None:
    """Close the process group, once every process is done with it: a group left to the interpreter's exit
    can abort the process there (its communication threads torn down in any order)."""
    if world_size() > 1 and torch.distributed.is_initialized():
        # what is left in reference cycles (a DeepSpeed engine and the model it points back at, with DeepSpeed's
        # own groups) goes now, while the group is alive, not at some later collection or at exit (CI saw one
        # process abort at exit after a DeepSpeed run, once: "terminate called without an active exception")
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
