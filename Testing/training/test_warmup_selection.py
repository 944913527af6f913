"""The warm-up's epoch choice: its later epochs are scored (the APM's prompts through the frozen decoder) and
the best one's APM, not the last one's, goes on to the joint phase - or the mean of the scored epochs' APMs
where that scores higher - through a deadline and a resumption."""

import time

import pytest
import torch
from sample_data import make_training_slices

from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.errors import Cancelled
from PromiseSegmentLib.model.promise import engine_for
from PromiseSegmentLib.training import trainer as trainer_module
from PromiseSegmentLib.training.config import TrainConfig, first_scored_warmup_epoch
from PromiseSegmentLib.training.trainer import Trainer, train_adapter

WARMUP = 4
CFG = TrainConfig(
    epochs=WARMUP + 1,
    apm_warmup_epochs=WARMUP,
    apm_joint_lr=0.0,  # the large-set recipe: the APM is kept as warmed up, so what enters the joint phase stays
    batch_size=4,
    lr=3e-3,
    augment=False,
    cache_features=True,
    apm_prompts=("box", "points"),
    apm_fusion_dim=32,
    apm_head_blocks=(1, 1, 1, 1),
)


@pytest.fixture(scope="module")
def cases():
    pairs = make_training_slices([1, 2], empty_share=0.0)[:10]
    return [Case(str(i), rgb, m) for i, (rgb, m) in enumerate(pairs)]


@pytest.fixture
def last_warmup_epoch_scores_worst(monkeypatch):
    """The real selection score, lowered by 1 for the last warm-up epoch: the case a constant learning rate
    produces at random (measured on Kvasir: 0.05 swings between epochs), made certain."""
    real = trainer_module.score_epoch

    def score(trainer, adapter=None):
        s = real(trainer, adapter)
        # scoring the last warm-up epoch (WARMUP - 1 epochs recorded), then the scored epochs' mean APM (WARMUP)
        if adapter is not None and len(trainer.history) in (WARMUP - 1, WARMUP):
            s.dice -= 1.0
        return s

    monkeypatch.setattr(trainer_module, "score_epoch", score)


@pytest.fixture
def warm_up_mean_scores_best(monkeypatch):
    """The real selection score, raised by 1 for the mean of the scored warm-up epochs' APMs."""
    real = trainer_module.score_epoch

    def score(trainer, adapter=None):
        s = real(trainer, adapter)
        if adapter is not None and len(trainer.history) == WARMUP:  # after the warm-up: the mean's score
            s.dice += 1.0
        return s

    monkeypatch.setattr(trainer_module, "score_epoch", score)


def _apm_parameters(trainer_or_adapter):
    return {k: v.detach().clone() for k, v in trainer_or_adapter.apm.named_parameters()}


def _run_recording(engine, cases, cfg, output=None, **kw):
    """A run, with the APM's parameters after every epoch (by epoch number)."""
    after = {}
    trainer = Trainer(engine, cases[2:], cases[:2], cfg, output)

    def progress(status):
        if status.record is not None:
            after[status.record.epoch] = _apm_parameters(trainer.adapter)

    result = trainer.run(kw.pop("resume", False), progress, kw.pop("cancel", None))
    return result, after


def test_the_best_scored_warm_up_epoch_s_apm_goes_on_not_the_last(tiny_backbone, cases, last_warmup_epoch_scores_worst):
    result, after = _run_recording(engine_for(tiny_backbone, None, "cpu"), cases, CFG)
    warm = [r for r in result.history if r.phase == "apm warm-up"]
    first = first_scored_warmup_epoch(CFG)
    assert all(r.val_dice != r.val_dice for r in warm[:first])  # the first half is not scored (NaN)
    assert all(0 <= r.val_dice + (r.epoch == WARMUP - 1) <= 1 for r in warm[first:])
    best = max(warm[first:], key=lambda r: r.val_dice).epoch
    assert best != WARMUP - 1
    kept = _apm_parameters(result.adapter)
    assert all(torch.equal(kept[k], v) for k, v in after[best].items())
    assert any(not torch.equal(kept[k], v) for k, v in after[WARMUP - 1].items())
    assert result.adapter.training["apm_warmup_epoch_kept"] == best + 1
    assert result.adapter.training["apm_warmup_mean_val_dice"] < 0  # scored (lowered), not kept


def test_a_resumed_run_keeps_the_same_warm_up_epoch(tiny_backbone, cases, tmp_path, last_warmup_epoch_scores_worst):
    from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache

    engine = engine_for(tiny_backbone, None, "cpu", cache=EmbeddingCache())
    whole = train_adapter(engine, cases[2:], cases[:2], CFG, tmp_path / "whole.safetensors")
    done = []
    with pytest.raises(Cancelled):  # interrupted between the warm-up's end and the joint phase
        train_adapter(
            engine,
            cases[2:],
            cases[:2],
            CFG,
            tmp_path / "r.safetensors",
            progress=lambda s: s.record and done.append(s.record.epoch),
            cancel=lambda: len(done) >= WARMUP,
        )
    resumed = train_adapter(engine, cases[2:], cases[:2], CFG, tmp_path / "r.safetensors", resume=True)
    a, b = _apm_parameters(whole.adapter), _apm_parameters(resumed.adapter)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.adapter.training["apm_warmup_epoch_kept"] == whole.adapter.training["apm_warmup_epoch_kept"]


def test_a_warm_up_cut_by_the_deadline_scores_its_last_epoch(tiny_backbone, cases):
    engine = engine_for(tiny_backbone, None, "cpu")
    # an hour left but a joint epoch estimated at two: the warm-up ends after its first (unscored) epoch
    trainer = Trainer(engine, cases[2:], cases[:2], CFG, None, deadline=time.monotonic() + 3600, joint_seconds=7200)
    result = trainer.run(False, None, None)
    assert [r.phase for r in result.history] == ["apm warm-up", "joint"]
    assert 0 <= result.history[0].val_dice <= 1 and result.adapter.training["apm_warmup_epoch_kept"] == 1


def test_the_mean_of_the_scored_warm_up_epochs_goes_on_where_it_scores_higher(
    tiny_backbone, cases, warm_up_mean_scores_best
):
    from PromiseSegmentLib.training.weight_average import WeightAverage

    result, after = _run_recording(engine_for(tiny_backbone, None, "cpu"), cases, CFG)
    scored = [r.epoch for r in result.history if r.phase == "apm warm-up" and r.val_dice == r.val_dice]
    assert len(scored) >= 2
    mean = {k: sum(after[e][k].double() for e in scored) / len(scored) for k in after[scored[0]]}
    kept = _apm_parameters(result.adapter)
    assert all(torch.allclose(kept[k], mean[k].float(), atol=1e-6) for k in kept)
    assert all(any(not torch.equal(kept[k], after[e][k]) for k in kept) for e in scored)  # no single epoch's
    training = result.adapter.training
    assert training["apm_warmup_mean_of_epochs"] == len(scored) and "apm_warmup_epoch_kept" not in training
    assert training["apm_warmup_val_dice"] > 1.0  # the (raised) score of the mean, above every epoch's
    assert training["apm_warmup_mean_val_dice"] == training["apm_warmup_val_dice"]
    average = WeightAverage()
    average.add({"w": torch.tensor([1.0, 3.0]), "n": torch.tensor([7])})
    assert average.mean() is None  # one state is no average
    average.add({"w": torch.tensor([2.0, 5.0]), "n": torch.tensor([8])})
    assert torch.equal(average.mean()["w"], torch.tensor([1.5, 4.0])) and torch.equal(
        average.mean()["n"], torch.tensor([8])
    )
