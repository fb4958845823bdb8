"""The torch.distributed process group's life in vlrm's scripts: created with nothing holding it that should not, and
freed, its threads joined, before the interpreter tears down.

A rank that finished its work and then exits with the group still alive runs the group's destructor during the
interpreter's teardown: gloo's worker threads (or NCCL's) are joined there, work objects holding tensors are freed
without a usable interpreter, and now and then the process aborts (``terminate called without an active
exception``, SIGABRT), so torchrun reports a finished run as failed. ``destroy_process_group`` alone does not prevent
it when anything still holds the group; two things did:

- the Trainer and the model: DDP or DeepSpeed's engine and optimizer hold the group, and so does every parameter
  DeepSpeed touched (its ``_dp_group`` attribute); the script drops them (``trainer.accelerator.free_memory()``, then
  ``del trainer, model``) before ``finish_process_group``, which also drops DeepSpeed's cache of groups
  (``deepspeed.utils.groups._WORLD_GROUP`` and the like);
- DeepSpeed: ``deepspeed.comm.torch.TorchBackend`` declares ``group=torch.distributed.GroupMember.WORLD`` as a default
  argument of its barriers, evaluated when the module is first imported. transformers imports it from inside the
  Trainer, after the group exists, and the function defaults then hold the world group for the life of the process.
  ``import_deepspeed_before_the_process_group`` imports it first, so the default is None.

What is still held after that (ZeRO-3 keeps the group in every partitioned parameter, its ``zero.Init`` context and
its offload hooks, and releases none of them) must not reach the teardown either: ``exit_now`` ends such a process
after flushing its logs and streams, without running the group's destructor; a warning says which threads were left.

``tests/test_distributed.py`` checks that no communication thread is left at the end of a 2-process run
(``communication_threads``, which ``finish_process_group`` logs); ``bench/bench_exits.py`` runs trainings in a row.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

COMMUNICATION_THREADS = ("gloo", "nccl")  # thread names (Linux) of the backends' worker and transport threads


def import_deepspeed_before_the_process_group() -> None:
    """Import DeepSpeed's communication module (when DeepSpeed is installed) before torch.distributed's default process
    group exists, so that its default arguments hold None, not the group (module docstring). Call it before anything
    runs ``init_process_group``: TrainConfig does, before TrainingArguments' set-up creates the group; eval_rm.py
    under torchrun too."""
    if os.environ.get("WORLD_SIZE", "1") == "1" or importlib.util.find_spec("deepspeed") is None:
        return
    import torch.distributed

    if torch.distributed.is_available() and not torch.distributed.is_initialized():
        import deepspeed.comm.torch  # noqa: F401


def _forget_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed caches in ``deepspeed.utils.groups`` (module globals: ``_WORLD_GROUP``, the
    data- and expert-parallel groups, dicts of them), when DeepSpeed was used; it has no call that releases them."""
    import sys

    import torch.distributed

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if isinstance(value, torch.distributed.ProcessGroup):
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(
            isinstance(item, torch.distributed.ProcessGroup) for item in value.values()
        ):
            value.clear()


def communication_threads() -> list[str]:
    """Names of this process's threads that belong to a gloo or NCCL process group (Linux: /proc; else [])."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # a thread that ended while we looked
            continue
        if any(backend in name for backend in COMMUNICATION_THREADS):
            names.append(name)
    return sorted(names)


def finish_process_group() -> list[str]:
    """Free the process group while the interpreter is whole: drop DeepSpeed's cached groups, destroy the group,
    collect. Call it once the trainer and the model are gone (module docstring). Returns the communication threads
    still running: none when nothing else holds the group; a warning names them otherwise."""
    import torch.distributed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []
    _forget_deepspeed_groups()
    gc.collect()
    torch.distributed.destroy_process_group()
    gc.collect()
    leftover = communication_threads()
    if leftover:
        logger.warning(
            "the process group is still held (%s threads run): this process ends without the interpreter's teardown, "
            "which would run its destructor", ", ".join(leftover),
        )  # fmt: skip
    else:
        logger.info("process group freed: no communication thread left")
    return leftover


def exit_now(code: int) -> None:
    """End the process with ``code`` at once, after flushing every log handler and the standard streams: for a
    process whose process group is still held (``finish_process_group``), so that its destructor never runs in the
    interpreter's teardown. Files the run wrote are closed already (checkpoints, results, the log)."""
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
