"""``run(cfg) -> summary``: one training run, from a composed config to a run directory of results.

The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``summary.json``,
``tb/`` (TensorBoard) and ``checkpoints/{best,last}.pt``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnn_bench.checkpoint import (FORMAT, atomic_link, atomic_save, load_checkpoint, model_weights,
                                  settings_changed)
from cnn_bench.config import run_dir_in_use, validate
from cnn_bench.data import build_data
from cnn_bench import early_stopping
from cnn_bench.ema import ModelEma
from cnn_bench.errors import CnnBenchError
from cnn_bench.finetune import apply_finetune
from cnn_bench.lookahead import Lookahead
from cnn_bench.loop import (StepModel, TrainState, compile_warmup, evaluate, first_batch,
                             train_one_epoch)
from cnn_bench.models.build import build_model, trained_model_config
from cnn_bench.models.pretrained import pretrained_normalization
from cnn_bench.models.profile import count_flops, count_params
from cnn_bench.optim import (build_optimizer, build_scheduler, load_optimizer_state,
                             load_scheduler_state)
from cnn_bench.runlog import RunLog, write_json
from cnn_bench.runtime import (peak_memory_mb, reset_peak_memory, resolve_runtime, rng_state,
                               seed_everything, set_rng_state)

log = logging.getLogger("cnn_bench")


def resolve_output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir`` if set, else Hydra's run directory."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise CnnBenchError("no output directory: set output_dir=... (or run through train.py)")


def _write_config(out: Path, cfg: DictConfig) -> None:
    """The resolved config as ``config.yaml`` and ``.hydra/resolved.yaml`` (Hydra's own
    ``.hydra/config.yaml`` keeps interpolations unresolved)."""
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    (out / "config.yaml").write_text(resolved)
    hydra_dir = out / ".hydra"
    if not hydra_dir.exists():  # called without Hydra (tests, notebooks): keep the same layout
        hydra_dir.mkdir()
        (hydra_dir / "config.yaml").write_text(resolved)
        (hydra_dir / "overrides.yaml").write_text("[]\n")
    (hydra_dir / "resolved.yaml").write_text(resolved)


def _resume_path(cfg: DictConfig, out: Path) -> Path | None:
    resume = cfg.trainer.resume
    if resume in (None, "", False):
        return None
    if resume == "auto":
        last = out / "checkpoints" / "last.pt"
        return last if last.exists() else None
    path = Path(resume)
    if not path.exists():
        raise CnnBenchError(f"trainer.resume: no checkpoint at {path}")
    return path


def _hparams(cfg: DictConfig, rt) -> dict:
    keys = ["model.name", "model.width_mult", "model.stem", "dataset.name", "dataset.resolution",
            "optimizer.name", "optimizer.lr", "optimizer.weight_decay", "scheduler.name",
            "augmentation.name", "trainer.epochs", "trainer.batch_size", "trainer.seed",
            "trainer.ema_decay", "trainer.lookahead_every", "trainer.tta"]
    keys += [k for k in _overridden_keys() if k not in keys]
    hp = {k: OmegaConf.select(cfg, k, default=None) for k in keys}
    hp["precision"] = rt.precision
    # plain values only: a group override (model=...) selects a whole node, named above
    return {k: v for k, v in hp.items() if v is not None and not OmegaConf.is_config(v)}


def _overridden_keys() -> list[str]:
    """The config keys this job's overrides set (a sweep job's swept ones among them), so the
    HPARAMS tab tells jobs apart by any setting, not only the fixed list above."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    task = HydraConfig.get().overrides.task
    keys = [o.split("=", 1)[0].lstrip("+~") for o in task if "=" in o]
    return [k for k in keys if not k.startswith("hydra") and "/" not in k]


def _init_from_data(model: nn.Module, train) -> None:
    """Data-dependent initialisation, for models that set ``wants_data_init`` (SpeedNet's
    whitening stem): hand ``model.init_from_data`` the first training batch, augmented and
    normalised as epoch 1 will see it. Reading it changes no later batch (loaders draw from
    (seed, epoch) alone) and, with the global RNG restored, no later random number."""
    if not getattr(model, "wants_data_init", False):
        return
    train.set_epoch(0)
    rng = rng_state()
    x, _ = first_batch(train)
    set_rng_state(rng)
    model.init_from_data(x)


def run(cfg: DictConfig) -> dict:
    """Train one model as the config says; return the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    validate(cfg)
    out = resolve_output_dir(cfg)
    taken = run_dir_in_use(cfg, out)
    if taken:
        raise CnnBenchError(taken)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, cfg)
    tr = cfg.trainer
    rt = resolve_runtime(tr)
    reset_peak_memory(rt.device)  # peak_mem_mb is this run's, not the process's (a sweep's jobs)
    if tr.compile:
        # Runs in one process (Hydra's basic sweep launcher, a notebook) add their graphs to
        # the same code objects' caches: past dynamo's recompile limit (8) a later run would
        # train eagerly without a word. Each run compiles afresh.
        torch._dynamo.reset()
    seed_everything(tr.seed)

    res = cfg.dataset.resolution
    # Pretrained weights expect the normalisation they were trained with (ImageNet's), at the
    # resolution the user chose; a copy, so the caller's (and the saved) config stay as given.
    data_cfg = cfg.dataset
    norm = pretrained_normalization(cfg.model)
    if norm is not None:
        data_cfg = OmegaConf.merge(OmegaConf.to_container(cfg.dataset, resolve=True),
                                   {"mean": norm[0], "std": norm[1]})
        log.info("model.pretrained: normalising with the weights' mean %s and std %s",
                 norm[0], norm[1])
    data = build_data(data_cfg, cfg.augmentation, batch_size=tr.batch_size, device=rt.device,
                      seed=tr.seed, channels_last=rt.channels_last,
                      eval_batch_size=tr.get("eval_batch_size"))
    # Re-seed after the data is built: initial weights then depend only on the seed and the
    # model config, so runs that differ only in data settings (resolution) start identical.
    seed_everything(tr.seed)
    resume = _resume_path(cfg, out)
    # A resumed run takes every weight from its checkpoint: the initial weights file (or the
    # pretrained download) is not read again, so it may have moved or gone since.
    model = build_model(trained_model_config(cfg.model, res) if resume else cfg.model,
                        data.num_classes, res)
    fresh = resume is None and cfg.model.get("weights") is None and not cfg.model.get("pretrained")
    freeze = apply_finetune(model, cfg.get("finetune"))
    params, trainable = count_params(model), count_params(model, trainable_only=True)
    flops = count_flops(model, res)
    model.to(rt.device, memory_format=rt.memory_format)
    log.info("model %s: %.2fM params (%.2fM trainable), %.3f GFLOPs/image at %d px; %s %s%s",
             cfg.model.name, params / 1e6, trainable / 1e6, flops / 1e9, res, rt.device,
             rt.precision, ", channels_last" if rt.channels_last else "")
    if freeze.frozen:
        log.info("finetune=%s: %d parameters train, %d frozen; frozen modules (eval mode): %s",
                 freeze.mode, freeze.trainable_params, freeze.frozen_params,
                 ", ".join(freeze.frozen))
        if fresh:
            log.warning("finetune=%s freezes %d parameters that start from a random "
                        "initialisation (no model.pretrained or model.weights): they will learn "
                        "nothing; load weights, or train everything with finetune=full",
                        freeze.mode, freeze.frozen_params)

    if len(data.train) == 0:
        raise CnnBenchError(f"the training split has {data.train.num_samples} images: too few "
                            f"for one batch; lower trainer.batch_size")
    if fresh:
        _init_from_data(model, data.train)
    steps_per_epoch = len(data.train) if tr.limit_train_batches is None else min(
        tr.limit_train_batches, len(data.train))
    optimizer = build_optimizer(cfg.optimizer, model, rt.device)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, tr.epochs)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.augmentation.get("label_smoothing", 0.0))
    eval_criterion = nn.CrossEntropyLoss()
    tta = tr.get("tta", "none")
    # The average starts as a copy of the initial (or loaded, finetune) weights.
    ema = (ModelEma(model, tr.ema_decay, tr.get("ema_warmup", True))
           if tr.get("ema_decay") is not None else None)
    lookahead = (Lookahead(model, tr.lookahead_every, tr.get("lookahead_decay", 0.77),
                           steps_per_epoch * tr.epochs)
                 if tr.get("lookahead_every") is not None else None)

    state = TrainState()
    ckpt_dir = out / "checkpoints"
    if resume is not None:
        # Loaded on the CPU: RNG states must stay there, and load_state_dict copies model and
        # optimizer tensors to the parameters' device itself.
        ck = load_checkpoint(resume)
        # Changed values that still load (optimizer.lr, scheduler=step) would be overridden by
        # the checkpoint's param groups, or mix two schedules, without a word. Keys the
        # checkpoint's config lacks (added by a later cnn_bench) are not a change.
        changed = settings_changed(ck, cfg, new_keys=False)
        if not changed:
            try:
                model.load_state_dict(ck["model"])
                load_optimizer_state(optimizer, ck["optimizer"])
                load_scheduler_state(scheduler, ck["scheduler"])
            except (RuntimeError, ValueError, KeyError) as e:
                changed = settings_changed(ck, cfg) or [str(e).strip().splitlines()[0][:160]]
        if changed:
            raise CnnBenchError(
                f"cannot resume from {resume}: it was trained with other settings "
                f"({'; '.join(changed)}); resume with the same model, optimizer, scheduler and "
                f"finetune settings, or start a new run from its weights "
                f"(model.weights={resume})")
        if ck["scaler"]:  # empty when the earlier attempt ran without one (bf16, fp32, CPU)
            scaler.load_state_dict(ck["scaler"])
        if ema is not None:
            if ck.get("model_ema") is not None:
                ema.load_state_dict(ck["model_ema"])
            else:  # the earlier attempt ran without EMA: average from the weights reached
                ema.module.load_state_dict(ck["model"])
                log.info("trainer.ema_decay: %s has no EMA weights; averaging from its own",
                         resume)
        if lookahead is not None:
            if ck.get("lookahead") is not None:
                lookahead.load_state_dict(ck["lookahead"])
            else:  # the earlier attempt ran without it: slow weights start from the model's
                lookahead.reset_to_model()
        state = TrainState(**ck["state"])
        set_rng_state(ck["rng"])
        if state.best_epoch == state.epoch and state.epoch > 0:
            # An interrupt between writing last.pt and linking best.pt leaves best.pt one best
            # behind, and nothing would renew it: link it again (a no-op when it is current).
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_link(resume, ckpt_dir / "best.pt")
        elif not (ckpt_dir / "best.pt").exists() and (resume.parent / "best.pt").exists():
            # trainer.resume=<path> into a new run directory: its best so far comes along, or a
            # run whose later epochs never beat it would end without best.pt and test score
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_link(resume.parent / "best.pt", ckpt_dir / "best.pt")
        log.info("resumed from %s at epoch %d", resume, state.epoch)
        _recheck_early_stop(state, tr.get("early_stopping"), tr.epochs)
        if state.epoch >= tr.epochs:  # (an early stop or a divergence says so itself)
            log.info("nothing to train: the run has trained %d of trainer.epochs=%d epochs "
                     "(raise trainer.epochs to train on)", state.epoch, tr.epochs)

    # A resumed run's wall time continues from its earlier attempts' (downtime not counted).
    wall_before = state.wall_time_s
    runlog = RunLog(out, start_step=state.global_step, start_epoch=state.epoch,
                    history=state.history)
    step_model = StepModel(model, tr.compile, tr.get("compile_mode", "default"))
    # Validation and test score the EMA weights when EMA is on (timm's --model-ema does too).
    eval_model = (StepModel(ema.module, tr.compile, tr.get("compile_mode", "default"))
                  if ema is not None else step_model)
    val_loader = data.val if data.val is not None else data.test
    val_name = ("val" if data.val is not None else "test" if data.test is not None
                else "no eval split")
    compile_s = 0.0  # this attempt's warm-up (compiled code is not in checkpoints: every attempt)
    if tr.compile and state.epoch < tr.epochs and not state.stop_reason:
        data.train.set_epoch(state.epoch)  # warm up on the batch the next epoch starts with
        compile_s = compile_warmup(step_model, data.train, eval_model, val_loader, criterion, rt,
                                   freeze=freeze, tta=tta, eval_limit=tr.limit_val_batches)
        state.compile_s += compile_s
        log.info("torch.compile warm-up: %.1f s (not part of epoch_time_s)", compile_s)
    first_epoch = state.epoch + 1  # the epoch whose record carries this attempt's compile_s

    def checkpoint(path: Path) -> None:
        state.wall_time_s = wall_before + time.perf_counter() - t_start
        atomic_save({
            "format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            **({"model_ema": ema.state_dict()} if ema is not None else {}),
            **({"lookahead": lookahead.state_dict()} if lookahead is not None else {}),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "state": vars(state).copy(), "rng": rng_state(),
            "config": OmegaConf.to_yaml(cfg, resolve=True), "classes": list(data.classes),
            "num_classes": data.num_classes, "resolution": res,
            "mean": list(data.mean), "std": list(data.std),
        }, path)

    while state.epoch < tr.epochs and not state.stop_reason:
        data.train.set_epoch(state.epoch)
        train_m = train_one_epoch(
            step_model, data.train, criterion, optimizer, scheduler, scaler, rt, state,
            limit=tr.limit_train_batches, log_every=tr.log_every_n_steps, grad_clip=tr.grad_clip,
            log_steps=runlog.steps, progress=tr.progress, freeze=freeze, ema=ema,
            lookahead=lookahead)
        state.epoch += 1
        state.train_time_s += train_m["seconds"]
        state.train_images += train_m["images"]
        # Non-finite weights, or finite ones whose outputs overflow (a non-finite val loss):
        # neither has an accuracy (the argmax of NaN logits is one class's share).
        diverged = "non-finite weights" if _diverged(model) else None
        val_m = (evaluate(eval_model, val_loader, eval_criterion, rt, data.num_classes,
                          limit=tr.limit_val_batches, desc=val_name, progress=tr.progress,
                          tta=tta)
                 if val_loader is not None and not diverged else {"loss": math.nan, "acc": math.nan})
        # (not in fp16: logits past its 65504 overflow while the model may still recover)
        if not diverged and val_loader is not None and rt.precision != "fp16" \
                and not math.isfinite(val_m["loss"]):
            diverged = f"{val_name} loss {val_m['loss']}: non-finite outputs"
            val_m["acc"] = math.nan
        record = {"epoch": state.epoch, "step": state.global_step,
                  "train/loss": train_m["loss"], "train/acc": train_m["acc"],
                  "val/loss": val_m["loss"], "val/acc": val_m["acc"],
                  "lr": train_m["lr"], "epoch_time_s": train_m["seconds"],
                  "val_time_s": val_m.get("seconds"),
                  "train/images_per_s": train_m["images"] / max(train_m["seconds"], 1e-9),
                  # the run's wall time so far, all attempts (a sweep report's unfinished jobs)
                  "wall_time_s": wall_before + time.perf_counter() - t_start}
        if state.epoch == first_epoch:
            record["compile_s"] = compile_s  # TensorBoard tag compile_s, like epoch_time_s
        state.history.append({k: v for k, v in record.items()})
        runlog.epoch(state.global_step, record)
        log.info("epoch %d/%d  train loss %.4f acc %.4f | %s loss %.4f acc %.4f | %.1fs, %.0f img/s",
                 state.epoch, tr.epochs, train_m["loss"], train_m["acc"], val_name, val_m["loss"],
                 val_m["acc"], train_m["seconds"], record["train/images_per_s"])
        # NaN never counts as an improvement (comparisons with NaN are False), and weights
        # gone non-finite never become the best.
        # With nothing to validate on, the latest weights are the best we know (Lightning's
        # monitor=None).
        is_best = not diverged and (val_loader is None or val_m["acc"] > state.best_metric
                                    or state.best_epoch == 0)
        if is_best:
            state.best_metric, state.best_epoch = val_m["acc"], state.epoch
        stop = early_stopping.check(tr.get("early_stopping"), record, state)
        # A stop on the last scheduled epoch is the end of the run, not an early stop.
        state.stop_reason = stop if state.epoch < tr.epochs else None
        if diverged:
            state.stop_reason = (
                f"training diverged at epoch {state.epoch} (train loss {train_m['loss']}, "
                f"{diverged}): lower optimizer.lr (now {cfg.optimizer.lr}) or set "
                f"trainer.grad_clip")
        if tr.save_last:
            checkpoint(ckpt_dir / "last.pt")
            if is_best:  # same content: link instead of serialising it twice
                atomic_link(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
        elif is_best:
            checkpoint(ckpt_dir / "best.pt")
        if state.stop_reason:
            (log.error if diverged else log.info)(state.stop_reason)
            break

    final_val = state.history[-1]["val/acc"] if state.history else math.nan
    test_acc = test_loss = None
    if data.test is not None and data.val is not None and (ckpt_dir / "best.pt").exists():
        # loaded on the CPU: load_state_dict copies to the model's device
        weights, which = model_weights(load_checkpoint(ckpt_dir / "best.pt"),
                                       use_ema=ema is not None)
        scored = eval_model if which == "ema" else step_model
        scored.eager.load_state_dict(weights)
        test_m = evaluate(scored, data.test, eval_criterion, rt, data.num_classes,
                          desc="test", progress=tr.progress, tta=tta)
        test_acc, test_loss = test_m["acc"], test_m["loss"]
        log.info("test (best epoch %d): loss %.4f acc %.4f", state.best_epoch, test_loss, test_acc)

    summary = {
        "model": cfg.model.name, "dataset": cfg.dataset.name, "resolution": res,
        "width_mult": cfg.model.get("width_mult"), "num_classes": data.num_classes,
        "params": params, "trainable_params": trainable, "flops": flops,
        "epochs": state.epoch, "steps": state.global_step, "stop_reason": state.stop_reason,
        "best_val_acc": state.best_metric if state.best_epoch else None,
        "best_epoch": state.best_epoch, "final_val_acc": final_val,
        "final_val_loss": state.history[-1]["val/loss"] if state.history else None,
        "final_train_acc": state.history[-1]["train/acc"] if state.history else None,
        "final_train_loss": state.history[-1]["train/loss"] if state.history else None,
        "test_acc": test_acc, "test_loss": test_loss,
        "wall_time_s": wall_before + time.perf_counter() - t_start,
        "train_images_per_s": state.train_images / max(state.train_time_s, 1e-9),
        "peak_mem_mb": peak_memory_mb(rt.device), "device": str(rt.device),
        "precision": rt.precision, "channels_last": rt.channels_last, "compile": bool(tr.compile),
        "compile_mode": tr.get("compile_mode", "default") if tr.compile else None,
        "compile_s": state.compile_s, "ema_decay": tr.get("ema_decay"),
        "lookahead_every": tr.get("lookahead_every"), "tta": tta,
        "in_memory": data.in_memory, "skipped_files": list(data.skipped),
    }
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in summary.items()}
    runlog.hparams(_hparams(cfg, rt), {k: summary[k] for k in
                                       ("best_val_acc", "final_val_acc", "test_acc")
                                       if summary[k] is not None})
    runlog.close()
    write_json(out / "summary.json", summary)
    log.info("summary: %s", out / "summary.json")
    if state.stop_reason and state.stop_reason.startswith("training diverged"):
        # a failed experiment: exit non-zero (a sweep records it as the job's failure)
        raise CnnBenchError(f"{state.stop_reason}; summary: {out / 'summary.json'}")
    return summary


def _diverged(model: nn.Module) -> bool:
    """Non-finite weights: nothing trains on from there. Checked once per epoch (one host sync).
    The epoch's loss alone says less: its last steps can be finite but huge while the update
    that followed them was not, and one overflowing fp16 step makes it inf while GradScaler
    skips that update and the weights stay finite."""
    params = [p.detach() for p in model.parameters()]
    return bool(params) and not bool(torch.stack([p.isfinite().all() for p in params]).all())


def _recheck_early_stop(state: TrainState, es_cfg, epochs: int) -> None:
    """On resume the patience now set decides: a checkpoint that stopped early goes on when it
    allows more epochs (raised, or off); one whose patience ran out on its last scheduled epoch
    (no stop then) stops rather than train past it when given more epochs."""
    earlier = state.stop_reason
    if state.epoch >= epochs or (earlier and not earlier.startswith("early stopping")):
        return  # nothing left to train, or it diverged
    state.stop_reason = early_stopping.exhausted(es_cfg, state)
    if earlier and not state.stop_reason:
        log.info("continuing past the earlier early stop (%s)", earlier)
    elif state.stop_reason:
        log.warning("nothing to train: %s; raise trainer.early_stopping.patience to go on",
                    state.stop_reason)
