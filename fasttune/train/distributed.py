"""Data-parallel runs under ``torchrun`` or ``accelerate launch``: who writes, and one run directory.

Accelerate (inside the Trainer) does the DDP work; fasttune only has to keep its own side
effects to one process: rank 0 prints, writes config.yaml, the report, the adapter and the
merged model. Every process must agree on the run directory, so rank 0 chooses it and
broadcasts it. The launchers set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``.
"""
from __future__ import annotations

import os
from pathlib import Path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start(cpu: bool) -> None:
    """Join the process group now (gloo on the CPU, NCCL on GPUs), before the run directory is chosen.

    A no-op for a single process. The Trainer later reuses this same accelerate state. The
    group is left again when the process exits, whichever way it does (``leave``).
    """
    if world_size() > 1:
        import atexit

        from accelerate import PartialState

        PartialState(cpu=cpu)
        atexit.register(leave)


def leave() -> None:
    """Destroy the process group while the interpreter is still whole.

    A process that exits with the group alive can abort in gloo's worker threads during
    interpreter teardown (SIGABRT, "terminate called without an active exception"); the launcher
    then takes the whole run as failed and stops rank 0, perhaps in the middle of its writes.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree_on(run_dir: Path) -> Path:
    """Rank 0's ``run_dir`` in every process (each computed its own timestamped name)."""
    if world_size() == 1:
        return run_dir
    from accelerate.utils import broadcast_object_list

    chosen = [str(run_dir)]
    broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])
