"""DataLoader worker processes: starting them without losing a Ctrl-C, and their deaths as one
line."""

from __future__ import annotations

import signal
import threading

from torch.utils.data import DataLoader


def start(loader: DataLoader):
    """``iter(loader)``, with a Ctrl-C that arrives while it forks the workers held until they
    are up: raised inside an at-fork hook (logging's), Python prints it as "Exception ignored"
    and the run went on."""
    if (loader.num_workers == 0 or getattr(loader, "_iterator", None) is not None
            or threading.current_thread() is not threading.main_thread()):
        return iter(loader)  # no fork: no workers, or persistent ones already running
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        batches = iter(loader)
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
    return batches


def worker_failure(exc: BaseException) -> str | None:
    """One line for a data worker that died (killed, often by the out-of-memory killer) or ran
    out of shared memory; ``None`` for any other error."""
    text = str(exc).strip()
    if "shared memory" in text or "/dev/shm" in text:
        return ("the data-loading workers ran out of shared memory (/dev/shm; Docker gives 64 MB "
                "unless started with --shm-size): enlarge it, or lower trainer.batch_size or "
                "dataset.num_workers (0 decodes in the main process); resume with "
                "trainer.resume=auto")
    if text.startswith("DataLoader worker (pid"):
        first = text.splitlines()[0].rstrip(". ")
        return (f"{first} (often the system's out-of-memory killer): lower dataset.num_workers "
                "or trainer.batch_size, or free memory; resume with trainer.resume=auto")
    return None
