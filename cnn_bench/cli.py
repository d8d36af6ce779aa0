"""Command-line glue: check the overrides before Hydra runs, and print user mistakes as one line."""

from __future__ import annotations

import functools
import itertools
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from cnn_bench.config import CONF_DIR, group_options, run_dir_in_use, validate
from cnn_bench.errors import CnnBenchError, did_you_mean, out_of_memory


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` on stderr and exit: the CLI's one way to report a user mistake."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def in_multirun() -> bool:
    """Whether this runs as a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def user_errors(fn: Callable | None = None, *, sweep_jobs: bool = True) -> Callable:
    """Wrap a Hydra task: a ``CnnBenchError``, a GPU out-of-memory error or a data worker's
    death in a single run exits with one line.

    In a training multirun the job runs through :func:`cnn_bench.sweep.job.run_sweep_job`: a
    finished job is skipped, an unfinished one resumes, and any failure is recorded in the job's
    ``status.json`` instead of stopping the sweep; the sweep callback reports it at the end.
    With ``sweep_jobs=False`` (evaluate.py: nothing to resume) every job is a single run, and
    the first failure stops the multirun with its line and a non-zero exit.
    """
    if fn is None:
        return functools.partial(user_errors, sweep_jobs=sweep_jobs)

    @functools.wraps(fn)
    def wrapper(cfg):
        if sweep_jobs and in_multirun():
            from cnn_bench.sweep.job import run_sweep_job

            return run_sweep_job(fn, cfg)
        import torch

        try:
            return fn(cfg)
        except CnnBenchError as e:
            fail(str(e))
        except torch.OutOfMemoryError as e:
            fail(out_of_memory(e, cfg))
        except RuntimeError as e:
            # A worker's death also surfaces through PyTorch's SIGCHLD handler, wherever the
            # main process is at the time (in backward(), say), not only in the loader.
            from cnn_bench.data.workers import worker_failure

            why = worker_failure(e)
            if why is None:
                raise
            fail(why)

    return wrapper


def _flat_keys(cfg, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, DictConfig):
            keys += _flat_keys(v, key + ".")
    return keys


def _closest_keys(key: str, keys: list[str]) -> str:
    """``did you mean`` for a config key, also by its last part (``epochs`` -> ``trainer.epochs``,
    ``trainer.lr`` -> ``optimizer.lr``)."""
    last = key.rpartition(".")[2]
    by_leaf = [k for k in keys if k.rpartition(".")[2] == last]
    if by_leaf and key not in by_leaf:
        return f"did you mean: {', '.join(sorted(by_leaf)[:3])}?"
    return did_you_mean(key, keys)


def _describe(ex: Exception, group_overrides: list[str], config_name: str) -> str:
    """Turn a Hydra composition error into one line with the closest valid choices."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(ex)
    if isinstance(ex, MissingConfigException) and ex.options:
        m = re.search(r"Could not find '([^']+)'", text)
        group, _, choice = (m.group(1) if m else "").rpartition("/")
        return f"unknown {group or 'config'} '{choice}': {did_you_mean(choice, ex.options)}"
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in str(ex.__cause__):
        key = m.group(1)
        keys: list[str] = []
        # the groups as chosen, else the defaults (a bad key like epochs=3 looks like a group)
        for groups in (group_overrides, []):
            try:
                keys = _flat_keys(compose_config(config_name, groups))
                break
            except Exception:  # noqa: BLE001
                continue
        return f"unknown config key '{key}': {_closest_keys(key, keys)}"
    if isinstance(ex, OverrideParseException):
        line = f"cannot parse override: {text.strip().splitlines()[0]}"
        key, _, value = (getattr(ex, "override", "") or "").partition("=")
        if "/" in value and re.search(r"[=,\s\[\]{}()]", value) and value[0] not in "'\"":
            # a sweep job's path (model.width_mult=0.5,trainer.seed=0/...) is not a plain value
            line += f"; quote the value: \"{key}='{value}'\""
        return line
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(ex).__name__)
    return first


# Hydra names a job after its script; the compose API would call it "app".
JOB_NAMES = {"config": "train", "evaluate": "evaluate"}


def compose_config(config_name: str, overrides: list[str], with_hydra: bool = False):
    """Compose ``conf/<config_name>.yaml`` with overrides outside a Hydra run (global state is
    cleared before and after); ``with_hydra`` keeps the ``hydra`` node, with the job named as
    its script names it (``${hydra.job.name}``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3",
                                   job_name=JOB_NAMES.get(config_name, config_name)):
            return compose(config_name=config_name, overrides=overrides,
                           return_hydra_config=with_hydra)
    finally:
        GlobalHydra.instance().clear()


def _candidate_override_lists(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (others at their first value), so each value is checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra.core.override_parser.types import Glob

    parsed = OverridesParser.create().parse_overrides(overrides)
    options = []
    for ov in parsed:
        if isinstance(ov.value(), Glob):
            # glob() needs Hydra's config loader to list a group's options: list them here.
            choices = group_options(ov.key_or_group)
            if not choices:
                continue  # not a config group: Hydra reports that itself
            names = ov.value().filter(choices)
            if not names:
                fail(f"{ov.input_line} matches no {ov.key_or_group} config "
                     f"({did_you_mean(ov.key_or_group, choices)})")
            values = [f"{ov.get_key_element()}={n}" for n in names]
        elif ov.is_sweep_override():
            values = [f"{ov.get_key_element()}={v}" for v in ov.sweep_string_iterator()]
        else:
            values = [ov.input_line]
        options.append(values or [ov.input_line])
    firsts = [vals[0] for vals in options]
    lists = [firsts]
    for i, vals in enumerate(options):
        for v in vals[1:]:
            lists.append(firsts[:i] + [v] + firsts[i + 1:])
    return lists


_READ_GROUPS = ("trainer", "dataset", "optimizer", "scheduler", "augmentation", "finetune")
# groups whose code reads the keys it knows and would ignore an added one (dataset and
# augmentation refuse unknown options themselves; a model's go to its builder)
_NO_ADDED_KEYS = ("trainer", "optimizer", "scheduler", "finetune")


def _check_override_shapes(overrides: list[str], multirun: bool, config_name: str) -> list:
    """One line for what composes but is not what the user meant: a swept key set again, several
    values without ``-m``, a list of options for a config group, an unknown ``hydra/`` option.
    Returns the parsed overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as ex:  # noqa: BLE001  (a grammar error: described below, with the rest)
        fail(_describe(ex, [], config_name))
    seen: dict = {}  # key -> its override
    for ov in parsed:
        key, value = ov.key_or_group, ov.input_line.partition("=")[2]
        if ov.is_delete() and key.partition(".")[0] in _READ_GROUPS and "." in key:
            # the trainer reads every key of these groups (a model's options are the builder's)
            fail(f"~{key} removes a setting cnn_bench reads: give it a value instead "
                 f"({key}=...; null where the setting allows it)")
        # A later value wins in Hydra (scripts append to a base command), but one of them a
        # sweep is a contradiction, named as such (it read as an excluded key otherwise).
        if key in seen and not ov.is_delete() and (ov.is_sweep_override() or seen[key].is_sweep_override()):
            fail(f"{key} is both swept and set ({seen[key].input_line.partition('=')[2]} and "
                 f"{value}): keep one")
        seen[key] = ov
        if ov.is_sweep_override() and not multirun:
            fail(f"{ov.input_line} gives several values, a sweep: add -m (python "
                 f"{'evaluate' if config_name == 'evaluate' else 'train'}.py -m ...), or give one value")
        if isinstance(ov.value(), list) and not key.startswith("hydra") and group_options(key):
            fail(f"{key} takes one option, not a list: to run each, sweep them with -m "
                 f"{ov.get_key_element()}={','.join(map(str, ov.value()))}")
        if key == "experiment" and not multirun and not ov.is_sweep_override():
            # an experiment may be a sweep itself (hydra.sweeper.params): without -m Hydra
            # would train its first job alone, without a word
            try:
                params = compose_config(config_name, [ov.input_line], with_hydra=True).hydra.sweeper.get("params")
            except Exception:  # noqa: BLE001  (an unknown experiment: described below)
                params = None
            fixed = {o.key_or_group for o in parsed if not o.is_sweep_override()}
            swept = [k for k in (params or {}) if k not in fixed]  # a fixed key is not swept
            if swept:
                fail(f"{ov.input_line} is a sweep over {', '.join(swept)}: run it with -m "
                     f"(python train.py -m {ov.input_line} ...), or fix those keys on the command line")
        if key.startswith("hydra/") and not ov.is_delete():
            try:
                compose_config(config_name, [ov.input_line], with_hydra=True)
            except Exception as ex:  # noqa: BLE001
                fail(_describe(ex, [], config_name))
    return parsed


def _named_run_dirs(cfg, parsed: list) -> list[str]:
    """The directories a single run will write to, where the command names them plainly
    (``hydra.run.dir=``, ``output_dir=``); interpolated ones are left to the run itself."""
    raw_output = cfg._get_node("output_dir")._value() if "output_dir" in cfg else None
    if isinstance(raw_output, str) and "hydra:runtime.output_dir" in raw_output:
        fail(f"output_dir={raw_output} refers to Hydra's run directory, which follows output_dir: "
             f"give output_dir a path, or set hydra.run.dir and leave output_dir out")
    dirs = [raw_output] if raw_output else []
    dirs += [str(ov.value()) for ov in parsed if ov.key_or_group == "hydra.run.dir"]
    return [d for d in dirs if isinstance(d, str) and "${" not in d]


def check_command_line(argv: list[str], config_name: str = "config") -> None:
    """Compose the config for every value on the command line; exit with one line on a mistake."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion \
            or args.config_dir or args.config_path:
        return  # Hydra's own informational modes, or a config tree we do not know
    config_name = args.config_name or config_name
    for o in args.overrides:
        if re.fullmatch(r"hydra/launcher=(slurm|submitit_\w+)", o):
            try:
                import hydra_plugins.hydra_submitit_launcher  # noqa: F401
            except ImportError:
                fail(f"{o} needs hydra-submitit-launcher: pip install -e \".[slurm]\"")
            # submitit's SLURM executor needs srun (it raises a bare RuntimeError otherwise);
            # its local executor (submitit_local) does not.
            if "local" not in o and shutil.which("srun") is None:
                fail(f"{o} submits to SLURM, but there is no 'srun' on this machine's PATH: run "
                     "the sweep from a SLURM login node, or drop hydra/launcher to run it here")
    local_gpus = "hydra/launcher=local_gpus" in args.overrides
    if local_gpus and config_name == "evaluate":  # its jobs' failures would end in exit 0
        fail("evaluate.py runs its jobs one after another: drop hydra/launcher=local_gpus")
    other_launcher = not local_gpus and any(o.startswith("hydra/launcher=") for o in args.overrides)
    for o in args.overrides:
        key, _, value = o.partition("=")
        if key not in ("hydra.launcher.n_jobs", "hydra.launcher.cpu_threads", "hydra.launcher.gpus") \
                or other_launcher:
            continue
        if not local_gpus:  # Hydra's own answer is five lines ending in "use +hydra.launcher..."
            fail(f"{key} is an option of the parallel launcher: add hydra/launcher=local_gpus")
        if key == "hydra.launcher.gpus":
            if value != "null" and not value.startswith("["):
                fail(f"hydra.launcher.gpus takes a list of GPU ids: hydra.launcher.gpus=[{value}]")
        elif value != "null" and not (value.isdigit() and int(value) >= 1):
            fail(f"{key} must be an integer >= 1 (or null for the default), got {value!r}")
    parsed = _check_override_shapes(args.overrides, args.multirun, config_name)
    overrides = [o for o in args.overrides if not o.startswith("hydra.") and not o.startswith("hydra/")]
    try:
        lists = _candidate_override_lists(overrides)
    except Exception as ex:  # noqa: BLE001  (parser errors are user mistakes)
        fail(_describe(ex, [], config_name))
    for ovs in itertools.islice(lists, 64):
        groups = [o for o in ovs if "=" in o and "." not in o.split("=", 1)[0]]
        try:
            cfg = compose_config(config_name, ovs)
        except Exception as ex:  # noqa: BLE001
            fail(_describe(ex, groups, config_name))
        try:
            validate(cfg)
        except CnnBenchError as ex:
            fail(str(ex))
        for o in ovs:  # +key added a key the group lacked (Hydra refuses it for one it has)
            key = o.partition("=")[0].lstrip("+")
            group, _, leaf = key.partition(".")
            if o.startswith("+") and not o.startswith("++") and group in _NO_ADDED_KEYS \
                    and leaf and "." not in leaf and config_name == "config":
                known = [k for k in cfg[group] if k != leaf]
                fail(f"{o}: {group} has no option '{leaf}', and nothing would read it "
                     f"({did_you_mean(leaf, known)}); set an existing option without '+'")
    if not args.multirun and config_name == "config":  # one composition: no sweep without -m
        for run_dir in _named_run_dirs(cfg, parsed):
            taken = run_dir_in_use(cfg, run_dir)
            if taken:  # said before Hydra writes its .hydra/ files into that directory
                fail(taken)


def name_jobs_by_swept_keys(argv: list[str], config_name: str) -> list[str]:
    """In a multirun, leave the fixed overrides out of job directory names.

    Hydra names a job by every override (``override_dirname``); with a dozen fixed settings that
    passes the 255-byte file-name limit. A job is then named by what varies across the sweep
    (``model=mobilenet_v2,model.width_mult=0.5,dataset.resolution=96``), plus sweeper params.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if not args.multirun or args.config_dir or args.config_path:
        return argv
    parsed = OverridesParser.create().parse_overrides(args.overrides)
    if any(ov.key_or_group == "hydra.job.config.override_dirname.exclude_keys" for ov in parsed):
        return argv  # the user chose the names
    extra = []
    if any(ov.is_sweep_override() for ov in parsed):
        hydra_cfg = compose_config(config_name, [], with_hydra=True).hydra
    else:
        # A sweep may come from the config instead (hydra.sweeper.params, e.g. an experiment
        # file): its fixed command-line overrides would make names past the 255-byte limit too.
        try:
            hydra_cfg = compose_config(config_name, args.overrides, with_hydra=True).hydra
        except Exception:  # noqa: BLE001  (Hydra reports its own composition errors)
            return argv
        if not hydra_cfg.sweeper.get("params") and not any(
                ov.key_or_group == "hydra.sweep.subdir" for ov in parsed):
            # Nothing varies: the one job would be named by every override (a dozen of them
            # pass the file-name limit) or, with all of them left out, by nothing; it takes
            # its number, Hydra's own default subdir.
            extra = ["hydra.sweep.subdir=${hydra.job.num}"]
    keys = list(hydra_cfg.job.config.override_dirname.exclude_keys)
    keys += [k for k in _fixed_settings(parsed) if k not in keys]
    return [*argv, f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]", *extra]


def _fixed_settings(parsed, ignore=()) -> dict[str, str]:
    """``key -> value`` of the parsed overrides that fix a job's settings: not swept, not
    ``hydra``, not in ``ignore``."""
    return {ov.key_or_group: ov.input_line.partition("=")[2] for ov in parsed
            if not ov.is_sweep_override() and not ov.key_or_group.startswith("hydra")
            and ov.key_or_group not in ignore}


def check_sweep_dir(argv: list[str], config_name: str = "config") -> None:
    """A sweep into a ``hydra.sweep.dir`` that holds an earlier sweep must fix the same settings.

    Jobs are named by what varies (:func:`name_jobs_by_swept_keys`) and a finished job is
    skipped, so a second sweep there with, say, another fixed resolution would take the first
    sweep's jobs as its own. The same command (to resume) or more swept values (to extend) pass.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    args = get_args_parser().parse_args(argv)
    parser = OverridesParser.create()
    if not args.multirun or not any(o.startswith("hydra.sweep.dir=") for o in args.overrides):
        return  # the default sweep dir is a new timestamped folder
    try:
        parsed = parser.parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001  (check_command_line has reported it)
        return
    # The folder as Hydra will use it: quotes removed, ${...} resolved against the config.
    sweep_dir = str([ov for ov in parsed if ov.key_or_group == "hydra.sweep.dir"][-1].value())
    if "${" in sweep_dir:
        fixed = [ov.input_line for ov in parsed if not ov.is_sweep_override()]
        from hydra.core.hydra_config import HydraConfig

        saved = HydraConfig.instance().cfg
        try:
            cfg = compose_config(config_name, fixed, with_hydra=True)
            HydraConfig.instance().set_config(cfg)  # for ${hydra:...}
            sweep_dir = str(cfg.hydra.sweep.dir)
        except Exception:  # noqa: BLE001  (Hydra reports an unresolvable dir itself)
            return
        finally:
            HydraConfig.instance().cfg = saved
    if not (Path(sweep_dir) / "multirun.yaml").is_file():
        return
    # keys that do not change what a job computes: the config's own exclude_keys
    ignore = set(OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    earlier = OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra.overrides.task
    before = _fixed_settings(parser.parse_overrides(list(earlier)), ignore)
    now = _fixed_settings(parsed, ignore)
    if before != now:
        diff = ", ".join(f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
                         for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k))
        fail(f"hydra.sweep.dir={sweep_dir} holds a sweep with other fixed settings ({diff}); its "
             f"finished jobs would be taken as this sweep's: use a new hydra.sweep.dir, or the "
             f"same fixed settings to resume or extend that sweep")


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _one_line_warnings() -> None:
    """cnn_bench's own warnings (unreadable files skipped, a cache not written) print as one
    ``warning:`` line, like its errors, not with the source line that raised them."""
    default = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if str(filename).startswith(_PACKAGE_DIR):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def launch(hydra_main: Callable[[], None], config_name: str = "config") -> None:
    """Check ``sys.argv`` for user mistakes, then hand over to the ``@hydra.main`` function."""
    _one_line_warnings()
    check_command_line(sys.argv[1:], config_name)
    check_sweep_dir(sys.argv[1:], config_name)
    sys.argv[1:] = name_jobs_by_swept_keys(sys.argv[1:], config_name)
    try:
        hydra_main()
    except KeyboardInterrupt:
        # Checkpoints are written atomically, so an interrupt never leaves a torn file behind.
        fail("interrupted; to resume, rerun the same command with trainer.resume=auto and "
             "hydra.run.dir=<the run dir> (a sweep: the same hydra.sweep.dir)", code=130)
