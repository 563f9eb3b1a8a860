"""A tiny ImageNet-stem model trains on a tiny synthetic JPEG folder, streamed (the ImageNet path)."""

import math

import pytest
import torch

from fastemp.config import load_config
from fastemp.data.synthetic import make_folder
from fastemp.train import Trainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("jpegs"), classes=2, per_class=8, size=64, seed=0, test_per_class=4)


def tiny(folder, *extra):
    """The ImageNet-100 recipe shrunk: 64 px JPEGs, S=32, width 8, the ImageNet stem."""
    return load_config(
        "imagenet100_n20",
        [
            f"data.path={folder}",
            "data.workers=0",
            "train.device=cpu",
            "augment.crop_size=32",
            "model.width=8",
            "model.hidden_dim=32",
            "model.z_dim=16",
            "train.n_patches=4",
            "train.batch_size=4",
            "train.log_every=1",
            "eval.patches=2",
            "eval.batch_size=4",
            "eval.probe_epochs=2",
            "eval.probe_batch_size=4",
            "eval.knn=false",
            *extra,
        ],
    )


def test_imagenet_stem_trains_on_streamed_jpegs_and_evaluates(folder, tmp_path):
    cfg = tiny(folder, "train.max_steps=3")
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.runtime.backend == "pillow" and "Pillow" in trainer.runtime.backend_reason  # auto on CPU
    assert trainer.model.backbone.conv1.kernel_size == (7, 7) and trainer.steps_per_epoch == 4
    summary = trainer.run()
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert 0.0 <= summary["linear_top1"] <= 1.0 and "streamed" in summary["data"]


def test_streamed_patches_are_the_same_after_a_restart(folder):
    """A resumed run rebuilds its trainer: step t's patches (epoch permutation, then the step's draw)
    must be the same, including across the epoch boundary (4 steps per epoch), and with prefetch."""
    first = Trainer(tiny(folder, "train.max_steps=8"), progress=False)
    patches = [first._begin_step(t) for t in (2, 3, 4, 5)]  # _begin_step prefetches step t+1
    again = Trainer(tiny(folder, "train.max_steps=8"), progress=False)
    for t, expected in zip((4, 5), patches[2:]):
        assert torch.equal(again._begin_step(t), expected)
    assert not torch.equal(patches[0], patches[1])


def test_streamed_dali_cpu_twin_trains(folder):
    pytest.importorskip("nvidia.dali")
    trainer = Trainer(tiny(folder, "train.max_steps=2", "data.backend=dali"), progress=False)
    assert trainer.runtime.backend == "dali"
    trainer.train_until()
    assert trainer.step == 2 and math.isfinite(trainer.last_record["loss"])


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["data.backend=torch"], "needs the images resident"),
        (["data.streamed=false", "data.backend=pillow"], "data.backend=pillow reads image files"),
        (["data.streamed=false", "data.backend=dali"], "data.backend=dali reads image files"),
        (["data.source=synthetic"], "data.streamed=true reads image files"),
        (["model.stem=imagnet"], "did you mean 'imagenet'"),
        (["augment.interpolation=cubic"], "augment.interpolation must be one of"),
        (["data.workers=-1"], "data.workers must be >= 0"),
    ],
)
def test_streamed_config_mistakes_are_one_line(folder, overrides, words):
    from fastemp.config import ConfigError
    from fastemp.validate import check_config

    with pytest.raises(ConfigError, match=words) as err:
        check_config(tiny(folder, *overrides))
    assert "\n" not in str(err.value)
