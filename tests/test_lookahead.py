"""Lookahead (``trainer.lookahead_every`` / ``lookahead_decay``): the slow weights against their
closed form on a hand-built model, and the trainer's use of them (the run ends on the slow
weights, checkpoints carry them, a resumed run continues exactly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cnn_bench.train as train_mod
from cnn_bench.checkpoint import load_checkpoint
from cnn_bench.config import validate
from cnn_bench.errors import CnnBenchError
from cnn_bench.lookahead import RAMP_POWER, Lookahead
from conftest import (compose_config, interrupt_after_first_epoch, sgd_steps, small_bn_net,
                      tiny_overrides)


pytestmark = pytest.mark.usefixtures("one_thread")


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("every,total", [(2, 6), (2, 5), (3, 7)])
def test_slow_weights_match_the_closed_form(every, total):
    """Every ``every`` steps: slow += w (fast - slow), fast = slow, w = 1 - d (n / total)^3;
    after the last step (between syncs too) the model holds the slow weights."""
    decay = 0.6
    model = small_bn_net()
    la = Lookahead(model, every, decay, total)
    slow = _float_state(model)
    for step in sgd_steps(model, total, lr=0.3):
        fast = _float_state(model)  # after the step, before the sync
        la.update(step)
        n = step + 1
        if n % every == 0:
            w = 1 - decay * (n / total) ** RAMP_POWER
            slow = {k: slow[k] + w * (fast[k] - slow[k]) for k in slow}
            expected = slow
        elif n == total:
            expected = slow
        else:
            expected = fast
        got = _float_state(model)
        for k in expected:  # BN running stats included
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7,
                                       msg=f"step {n}: {k}")
    for k, v in la.state_dict().items():
        torch.testing.assert_close(v, slow[k], rtol=1e-6, atol=1e-7)


def test_early_syncs_follow_the_model_and_late_ones_pull_back():
    model = small_bn_net()
    la = Lookahead(model, 1, 0.77, 100)
    assert la.decay_at(1) == pytest.approx(0.77e-6)
    assert la.decay_at(50) == pytest.approx(0.77 / 8)
    assert la.decay_at(100) == pytest.approx(0.77)
    init = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    la.update(99)  # the last step: the model moves back by 0.77 of its step
    torch.testing.assert_close(model[0].weight.detach(), init + 0.23)
    torch.testing.assert_close(model[0].weight.detach(), la.state_dict()["0.weight"])
    assert la.state_dict()["0.weight"] is not model[0].weight


def test_frozen_parameters_are_left_out():
    model = small_bn_net()
    model[0].weight.requires_grad_(False)
    la = Lookahead(model, 2, 0.5, 10)
    assert "0.weight" not in la.state_dict() and "0.bias" in la.state_dict()
    assert "1.running_mean" in la.state_dict() and "1.num_batches_tracked" not in la.state_dict()


def test_bad_lookahead_settings_are_one_line_errors(tiny_folder, tmp_path):
    with pytest.raises(CnnBenchError, match="lookahead_every"):
        Lookahead(small_bn_net(), 0, 0.5, 10)
    with pytest.raises(CnnBenchError, match="lookahead_decay"):
        Lookahead(small_bn_net(), 5, 1.0, 10)
    for bad, match in (("trainer.lookahead_decay=1.0", "lookahead_decay"),
                       ("trainer.lookahead_every=0", "lookahead_every"),
                       ("trainer.lookahead_every=2.5", "lookahead_every")):
        cfg = compose_config(tiny_overrides(tiny_folder, tmp_path, "trainer.lookahead_every=5", bad))
        with pytest.raises(CnnBenchError, match=match):
            validate(cfg)


def _train(root, out, *extra):
    return train_mod.run(compose_config(tiny_overrides(root, out, *extra)))


def test_run_ends_on_the_slow_weights_and_checkpoints_them(tiny_folder, tmp_path, monkeypatch):
    short = ["trainer.epochs=2", "trainer.limit_train_batches=3", "augmentation=basic"]
    la = ["trainer.lookahead_every=4", "trainer.lookahead_decay=0.5"]
    plain = _train(tiny_folder, tmp_path / "plain", *short)
    s = _train(tiny_folder, tmp_path / "la", *short, *la)
    assert s["lookahead_every"] == 4 and plain["lookahead_every"] is None
    ck = torch.load(tmp_path / "la/checkpoints/last.pt", weights_only=True)
    assert "lookahead" not in load_checkpoint(tmp_path / "plain/checkpoints/last.pt")
    # 6 steps, one sync after step 4: the run ends between syncs, on the slow copy.
    assert ck["lookahead"].keys() <= ck["model"].keys() and ck["lookahead"]
    for k, v in ck["lookahead"].items():
        assert torch.equal(ck["model"][k], v), k
    assert s["final_train_loss"] != plain["final_train_loss"]  # it changed the trajectory
    # After epoch 1 (step 3, before any sync) the checkpoint holds both copies, and they differ.
    interrupt_after_first_epoch(monkeypatch, lambda: _train(tiny_folder, tmp_path / "mid",
                                                            *short, *la))
    mid = torch.load(tmp_path / "mid/checkpoints/last.pt", weights_only=True)
    assert any(not torch.equal(mid["model"][k], v) for k, v in mid["lookahead"].items())


def test_resume_with_lookahead_matches_uninterrupted_run(tiny_folder, tmp_path, monkeypatch):
    # 3 epochs x 3 steps with a sync every 2: the interruption falls between two syncs, so the
    # slow weights must come back from the checkpoint for the runs to agree.
    extra = ["trainer.epochs=3", "augmentation=basic", "trainer.seed=3",
             "trainer.lookahead_every=2", "trainer.lookahead_decay=0.6",
             "trainer.limit_train_batches=3"]
    full = tmp_path / "full"
    _train(tiny_folder, full, *extra)
    part = tmp_path / "part"
    interrupt_after_first_epoch(monkeypatch, lambda: _train(tiny_folder, part, *extra))
    _train(tiny_folder, part, *extra, "trainer.resume=auto")
    a = load_checkpoint(full / "checkpoints/last.pt")
    b = load_checkpoint(part / "checkpoints/last.pt")
    for key in ("model", "lookahead"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
