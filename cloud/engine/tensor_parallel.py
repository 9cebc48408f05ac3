"""The torch side of `--tensor-parallel N`: a sharded engine, and the ranks' channel.

Part of `cloud.engine`, the package that alone imports torch and transformers. Runs under
torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the environment): transformers
loads this process's shard with the model's own tensor-parallel plan and sets up the
default process group (NCCL on CUDA, gloo on CPU) its forwards all-reduce on. Engine
calls travel between the ranks on a separate gloo group (`TorchChannel`), off the GPU
(see `cloud.tensor_parallel`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cloud.tensor_parallel import SharedClock

# A rank waits for rank 0's next call at most this long (rank 0 sends a heartbeat every
# minute while idle, `cloud.tensor_parallel.HEARTBEAT_S`).
_CALL_TIMEOUT = timedelta(hours=2)


class TorchChannel:
    """`cloud.tensor_parallel.Channel` over a gloo group of all ranks."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=_CALL_TIMEOUT)

    def send(self, message: Any) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree(self, value: str) -> list[str]:
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return [str(v) for v in values]

    def smallest(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_sharded(
    cls: Any,
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    max_cache_bytes: int | None = None,
    session_ttl_s: float = 600.0,
    max_running: int | None = None,
    context_length: int | None = None,
) -> tuple[Any, TorchChannel, SharedClock]:
    """This rank's engine of class `cls` (a `TransformersEngine`) on its shard, the channel
    to the other ranks, and the clock the engine reads (rank 0's time for each call).

    Every rank gets the smallest KV budget any rank planned, so that all evict alike."""
    if getattr(cls, "kind", "rows") != "rows":
        raise ValueError(
            f"--tensor-parallel runs the rows engine: the {cls.kind} engine's KV pool is not "
            "sharded across ranks yet (use --engine rows)"
        )
    clock = SharedClock()
    engine = cls.load(
        model,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
        max_cache_bytes=max_cache_bytes,
        session_ttl_s=session_ttl_s,
        context_length=context_length,
        clock=clock,
        max_running=max_running,
        tp_plan="auto",
    )
    channel = TorchChannel()
    budget = channel.smallest(int(engine.max_cache_bytes))
    if budget != engine.max_cache_bytes:
        engine.max_cache_bytes = budget
    return engine, channel, clock
