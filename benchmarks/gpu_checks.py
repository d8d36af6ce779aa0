#!/usr/bin/env python
"""The GPU checks of BENCHMARKS.md as one prepared pass, for a lent GPU machine with little time.

A lent machine gives a session about 15 minutes in all, its start included, and brings back at
most 8 files. This script spends them in order of value and leaves three files in
``--out-dir`` (``$OUT``): ``report.md`` (every step's markdown table, or why it did not run),
``logs.txt`` (the end of each step's output) and ``step.log`` (the last step's whole output,
written as it runs). The report is rewritten before and after every step, so a pass cut short
still returns what it finished and what it was doing. Without a visible GPU it stops at once.

Steps (``--list`` prints them with their time estimates): the CUDA tests (``tests/test_cuda.py``
and the CUDA cases of ``tests/test_kernels.py``), ResNet-50 @224 bf16 throughput (G1),
one seed of each CIFAR-10 recipe to 94% (G3), the CIFAR models' throughput on the real data
(G2), airbench94 itself on the same data (G3's peer), channels_last on/off per family (G6), and
timm's train.py (G4, only where ``$TIMM_TRAIN_SCRIPT`` names it or ``--prepare`` carried it).
A step starts only while the budget still holds its estimate, and runs for at most twice its
estimate or what is left of the budget.

Here, once (needs the package index)::

    python benchmarks/gpu_checks.py --prepare     # wheels -> .whl/, CIFAR-10 JPEGs -> .gpu/
    # with TIMM_TRAIN_SCRIPT=<timm's train.py> set, it goes to .gpu/ too and G4 runs there

There, through the device tool (``carry: [".whl", ".gpu"]``, ``timeout_s`` ~ budget + 60)::

    python3 benchmarks/gpu_checks.py --budget 480

``--smoke`` runs the same steps on CPU in the benchmarks' smoke modes (tests use it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
# What the GPU machine's image lacks (it has torch, torchvision, tensorboard, tqdm, matplotlib,
# safetensors and timm). antlr4-python3-runtime is an sdist on PyPI: --prepare builds its wheel.
WHEELS = ["hydra-core==1.3.8", "omegaconf==2.3.1", "antlr4-python3-runtime==4.9.3",
          "airbench==0.1.8"]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
TIMM_SCRIPT_NAME = "timm_train.py"  # timm's train.py, as --prepare copies it into .gpu/


@dataclass
class Step:
    """One check: what it measures, the seconds it needs (estimated for one H100/H200, a cold
    start included), and its command for (data folder, report file, smoke?)."""

    name: str
    measures: str
    est_s: int
    argv: callable
    needs: tuple[str, ...] = ()   # importable modules, else skipped with one line


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / name), *args]


def _throughput(specs: list[str], *extra: str, real_data: bool = False):
    def argv(data: Path, out: Path, smoke: bool) -> list[str]:
        args = [*extra, *(["--data", str(data)] if real_data else [])]
        if smoke:
            return _script("throughput.py", "--smoke", "speednet_s:16:8", *args, "--out", str(out))
        return _script("throughput.py", *specs, "--steps", "30", "--warmup-steps", "10",
                       "--eval-steps", "10", "--repeats", "3", *args, "--out", str(out))
    return argv


def _to_accuracy(experiment: str):
    def argv(data: Path, out: Path, smoke: bool) -> list[str]:
        # 8 decode workers: the first run decodes 60,000 JPEGs (later ones read the cache)
        return _script("time_to_accuracy.py", "--data", str(data), "--experiments", experiment,
                       "--seeds", "0", "--workdir", str(Path(tempfile.gettempdir()) / "gpu_tta"),
                       *(["--smoke"] if smoke else ["--set", "dataset.num_workers=8"]),
                       "--out", str(out))
    return argv


def _airbench(data: Path, out: Path, smoke: bool) -> list[str]:
    return _script("airbench_ref.py", "--data", str(data), "--seeds", "0",
                   *(["--smoke"] if smoke else []), "--out", str(out))


def _timm(data: Path, out: Path, smoke: bool) -> list[str]:
    if smoke:
        return _script("vs_timm.py", "--data", str(data), "--smoke", "--source", "timm",
                       "--model", "resnet18", "--resolution", "16", "--batch-size", "8",
                       "--out", str(out))
    return _script("vs_timm.py", "--data", str(data), "--source", "timm", "--model", "resnet18",
                   "--epochs", "5", "--batch-size", "512", "--lr", "0.4", "--workers", "8",
                   "--repeats", "1", "--out", str(out))


def _cuda_tests(data: Path, out: Path, smoke: bool) -> list[str]:
    opts = "tests/test_kernels.py::test_"
    return [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
            "tests/test_cuda.py", f"{opts}fused_matches_for_loop_on_cuda",
            f"{opts}evaluate_syncs_once_per_pass_on_cuda"]


STEPS = [
    Step("cuda_tests", "the CUDA paths work: bf16/channels_last, fp16 scaler, compile, CUDA "
         "graphs, resume, evaluate, no host sync per step", 120, _cuda_tests),
    Step("g1_resnet50", "ResNet-50 @224 bf16 train img/s (target >= 3,000; synthetic data)",
         90, _throughput(["resnet50:224:256:bf16"])),
    Step("g3_speedrun", "cifar10_speedrun: time to 94%, 1 seed (target <= 10 s)", 150,
         _to_accuracy("cifar10_speedrun")),
    Step("g2_cifar", "the CIFAR recipes' models on GPU-resident real data: img/s, data % of "
         "step (the loader with the speedrun's augmentation)", 80,
         _throughput(["speednet:32:1024:bf16", "resnet18:32:512:bf16"], "--loader-experiment",
                     "cifar10_speedrun", real_data=True)),
    Step("airbench", "airbench94 itself on the same JPEGs, 1 seed (the peer)", 90, _airbench,
         needs=("airbench",)),
    Step("g3_resnet18", "cifar10_resnet18: time to 94%, 1 seed (target <= 90 s)", 240,
         _to_accuracy("cifar10_resnet18")),
    Step("g6_cl_on", "channels_last on, per family (RegNetX grouped convs are reported slower)",
         90, _throughput(["regnetx_400mf:224:256:bf16", "mobilenet_v2:224:256:bf16"],
                         "--channels-last", "true")),
    Step("g6_cl_off", "channels_last off, the same models", 90,
         _throughput(["regnetx_400mf:224:256:bf16", "mobilenet_v2:224:256:bf16"],
                     "--channels-last", "false")),
    Step("g4_timm", "timm's train.py vs cnn_bench, same work (target <= 0.8x its wall time)",
         240, _timm, needs=("timm",)),
]


def _missing(step: Step) -> str | None:
    import importlib.util

    for mod in step.needs:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    if step.name == "g4_timm" and not os.environ.get("TIMM_TRAIN_SCRIPT"):
        return "$TIMM_TRAIN_SCRIPT (timm's train.py) is not set"
    return None


def install_wheels(wheels: Path, target: Path) -> str:
    """pip-install ``wheels/*.whl`` into ``target`` (put on the path of this process and every
    step); returns one line saying what happened."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        return f"no wheels in {wheels}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--upgrade", "--target", str(target), *files], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target),
                                                             os.environ.get("PYTHONPATH")]))
    return f"installed {len(files)} wheels into {target}"


def unpack(tar: Path, dest: Path) -> Path:
    """The ImageFolder root: ``dest`` once ``tar`` (train/, test/) is unpacked there."""
    if not (dest / "train").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar, "r:xz") as t:
            t.extractall(dest, filter="data")
    return dest


def prepare(wheels: Path, gpu_dir: Path) -> None:
    """Here: wheels for what the GPU image lacks, the CIFAR-10 JPEGs and, where
    ``$TIMM_TRAIN_SCRIPT`` names it, timm's train.py (for G4) into ignored folders."""
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    *WHEELS], check=True)
    gpu_dir.mkdir(exist_ok=True)
    shutil.copy2(CIFAR_TAR, gpu_dir / CIFAR_TAR.name)
    took = [CIFAR_TAR.name]
    timm_script = os.environ.get("TIMM_TRAIN_SCRIPT")
    if timm_script and Path(timm_script).expanduser().is_file():
        shutil.copy2(Path(timm_script).expanduser(), gpu_dir / TIMM_SCRIPT_NAME)
        took.append(TIMM_SCRIPT_NAME)
    print(f"wrote {', '.join(p.name for p in sorted(wheels.glob('*.whl')))} to {wheels} and "
          f"{', '.join(took)} to {gpu_dir}; carry both")


def _run(argv: list[str], timeout: float, log_path: Path) -> tuple[int | None, str]:
    """Run ``argv`` in its own process group, its output going to ``log_path`` as it comes (a
    pass cut off by the device's time limit still brings the running step's output back);
    (exit code or ``None`` if it ran past ``timeout``, its output). Past the timeout the whole
    group is killed: a benchmark's own children (train.py runs) must not keep the GPU busy."""
    import signal

    with open(log_path, "w+") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        log.seek(0)
        return code, log.read()


# What a pass must not hide: a silent compile fallback, CUDA graphs turned off (e.g. for
# BatchNorm's in-place running stats), recompiles; they change speed without failing a step.
NOTABLE = ("torch.compile failed", "CUDA graphs skipped", "skipping cudagraphs", "recompil")


def notable_lines(output: str, limit: int = 8) -> list[str]:
    """The distinct output lines that mention one of ``NOTABLE`` (at most ``limit``, trimmed)."""
    seen: list[str] = []
    for ln in output.splitlines():
        ln = ln.strip()[:300]
        if any(k in ln for k in NOTABLE) and ln not in seen:
            seen.append(ln)
    return seen[:limit]


def run_steps(steps: list[Step], data: Path, out_dir: Path, budget: float, smoke: bool,
              setup: list[str]) -> list[tuple[Step, str]]:
    """Run ``steps`` in order within ``budget`` seconds; write report.md and logs.txt after each."""
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_checks_"))
    results: list[tuple[Step, str]] = []
    sections, logs = [], []
    def write(running: str | None = None) -> None:
        head = ["# GPU checks", "", *[f"- {ln}" for ln in setup],
                f"- budget {budget:.0f} s, used {time.perf_counter() - t0:.0f} s", ""]
        now = [f"## {running}: running (cut off? its output so far is in step.log)"] if running else []
        (out_dir / "report.md").write_text("\n".join(head) + "\n" + "\n\n".join(sections + now)
                                           + "\n")
        (out_dir / "logs.txt").write_text("\n\n".join(logs) + "\n")

    for step in steps:
        left = max(0.0, budget - (time.perf_counter() - t0))
        reason = _missing(step)
        if reason is None and left < (1 if smoke else step.est_s):
            reason = f"not started: {left:.0f} s of the budget left, it needs ~{step.est_s} s"
        if reason is not None:
            results.append((step, f"skipped ({reason})"))
            sections.append(f"## {step.name}: skipped\n\n{step.measures}. {reason}.")
        else:
            md = work / f"{step.name}.md"
            argv = step.argv(data, md, smoke)
            start = time.perf_counter()
            # a step that hangs (a stuck compile, say) must not take the steps after it
            limit = min(left, 2 * step.est_s) if not smoke else left
            write(running=step.name)
            code, output = _run(argv, limit, out_dir / "step.log")
            status = ("ok" if code == 0 else f"exit {code}" if code is not None
                      else f"stopped after {limit:.0f} s (twice its estimate, or the budget)")
            if status == "ok" and step.name == "cuda_tests" and not smoke and " skipped" in output:
                status = "ok, but some CUDA tests were skipped (see below)"
            took = time.perf_counter() - start
            results.append((step, f"{status}, {took:.0f} s"))
            # pytest writes no report: its summary lines are the result
            body = md.read_text() if md.is_file() else "```\n" + "\n".join(
                output.strip().splitlines()[-15:]) + "\n```"
            flagged = notable_lines(output)
            if flagged:
                body += "\n\nIn its output:\n\n" + "\n".join(f"- `{ln}`" for ln in flagged)
            sections.append(f"## {step.name}: {status}, {took:.0f} s\n\n{step.measures}.\n\n"
                            f"`{' '.join(argv)}`\n\n{body}")
            logs.append(f"==== {step.name}: {status}, {took:.0f} s\n{output[-6000:]}")
        write()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--prepare", action="store_true", help="here: fetch wheels and data, then stop")
    p.add_argument("--list", action="store_true", help="print the steps and stop")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps (480)")
    p.add_argument("--only", help="comma-separated step names (default: all, in order)")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheels to install (.whl)")
    p.add_argument("--data", type=Path, help="CIFAR-10 ImageFolder (default: unpack --data-tar)")
    p.add_argument("--data-tar", type=Path, default=REPO / ".gpu" / CIFAR_TAR.name)
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", ".")),
                   help="where report.md and logs.txt go (default $OUT)")
    p.add_argument("--smoke", action="store_true", help="the steps' smoke modes (CPU; --data needed)")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.wheels, args.data_tar.parent)
        return 0
    steps = STEPS
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in {s.name for s in STEPS}]
        if unknown:
            p.error(f"unknown step(s) {', '.join(unknown)}; see --list")
        steps = [s for s in STEPS if s.name in names]
    if args.list:
        for s in steps:
            print(f"{s.name:12s} ~{s.est_s:4d} s  {s.measures}")
        return 0
    import torch

    setup = [f"torch {torch.__version__}, "
             + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")]
    if not args.smoke and not torch.cuda.is_available():
        # every step would run on the CPU into the budget, and the CUDA tests skip as "ok"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: nothing run; "
               "check nvidia-smi and that torch's CUDA build matches the driver")
        (args.out_dir / "report.md").write_text(f"# GPU checks\n\n{why}\n")
        print(why, file=sys.stderr)
        return 1
    if args.wheels.is_dir():
        setup.append(install_wheels(args.wheels, Path(tempfile.gettempdir()) / "gpu_site"))
    carried_timm = args.data_tar.parent / TIMM_SCRIPT_NAME
    if not os.environ.get("TIMM_TRAIN_SCRIPT") and carried_timm.is_file():
        os.environ["TIMM_TRAIN_SCRIPT"] = str(carried_timm)
    if os.environ.get("TIMM_TRAIN_SCRIPT"):
        setup.append(f"timm's train.py: {os.environ['TIMM_TRAIN_SCRIPT']}")
    if Path("/dev/shm").is_dir():  # DataLoader workers hand batches over through it
        shm = shutil.disk_usage("/dev/shm")
        setup.append(f"/dev/shm: {shm.free / 2**30:.1f} GiB free of {shm.total / 2**30:.1f}")
    data = args.data
    if data is None:
        if not args.data_tar.is_file():
            p.error(f"no --data and no {args.data_tar}: run --prepare here and carry .gpu")
        data = unpack(args.data_tar, Path(tempfile.gettempdir()) / "cifar")
    setup.append(f"data: {data}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = run_steps(steps, data, args.out_dir, args.budget, args.smoke, setup)
    for step, status in results:
        print(f"{step.name}: {status}")
    return 0 if all(s.startswith(("ok", "skipped")) for _, s in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
