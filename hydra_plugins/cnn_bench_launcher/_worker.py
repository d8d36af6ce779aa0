"""Worker process of the ``local_gpus`` launcher: runs one Hydra job, pickles its ``JobReturn``.

Usage (by the launcher only): ``python -m hydra_plugins.cnn_bench_launcher._worker RESULT_PATH``
with ``{"config": <job config>, "task": <task reference>}`` pickled on stdin.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import signal
import sys
from typing import Any


def load_task(ref: dict) -> Any:
    """Import the task function named by ``local_gpus_launcher.task_reference``."""
    if ref["file"]:
        # The app's script: import it under another name, so its `if __name__ == "__main__"`
        # block does not start a second Hydra run.
        spec = importlib.util.spec_from_file_location("_cnn_bench_task_script", ref["file"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(ref["module"])
    obj: Any = module
    for part in ref["qualname"].split("."):
        obj = getattr(obj, part)
    for _ in range(ref["unwrap"]):
        obj = obj.__wrapped__
    return obj


def _picklable(ret) -> Any:
    try:
        pickle.dumps(ret)
    except Exception:  # noqa: BLE001  (an exception or result that cannot cross processes)
        ret.return_value = RuntimeError(repr(ret._return_value))
    return ret


def restore_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt again. A launcher started in the background by a script
    inherits SIGINT ignored, and so would this worker: the SIGINT the launcher sends it to stop
    would then do nothing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(result_path: str) -> None:
    restore_sigint()
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import JobRuntime, run_job, setup_globals
    from hydra.types import HydraContext

    payload = pickle.load(sys.stdin.buffer)
    config = payload["config"]
    setup_globals()
    JobRuntime.instance().set("name", config.hydra.job.name)
    task = load_task(payload["task"])
    # run_job only uses the context's callbacks; the config is already composed.
    context = HydraContext(config_loader=None, callbacks=Callbacks(config))
    ret = run_job(hydra_context=context, task_function=task, config=config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    with open(result_path, "wb") as f:
        pickle.dump(_picklable(ret), f)


if __name__ == "__main__":
    main(sys.argv[1])
