import os

import matplotlib
import matplotlib.figure
import pytest
import torch

from tsds_interp.model import ModelConfig, build_model
from tsds_interp.task import TaskConfig


def tiny_task() -> TaskConfig:
    return TaskConfig(width=2, budget=2, train_cells=((1, 1), (1, 2), (2, 1)), ood_cells=((2, 2),))


def __getattr__(name: str):
    """``TINY_TASK``, made when a test module asks for it, not while this file loads (a fault in
    ``TaskConfig`` then fails the tests that use it, not the loading of every test)."""
    if name == "TINY_TASK":
        return tiny_task()
    raise AttributeError(name)


@pytest.fixture(scope="session")
def tiny_cfg():
    return ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0, task=tiny_task())


@pytest.fixture(scope="session")
def random_model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """The tiny pipeline, trained once per test session (base, sft, rl checkpoints)."""
    from tsds_interp.train import pipeline

    out = tmp_path_factory.mktemp("tiny_pipeline")
    return pipeline("tiny", out, quiet=True), out


@pytest.fixture(scope="session")
def trained_steps(tmp_path_factory):
    """The tiny step-format pipeline, trained once per test session (base, sft, rl checkpoints)."""
    from tsds_interp.train import pipeline

    out = tmp_path_factory.mktemp("steps_pipeline")
    return pipeline("steps_tiny", out, quiet=True), out


@pytest.fixture
def figures(monkeypatch):
    """Title, panel titles and colour-bar labels of every figure saved, by file name."""
    seen = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *args, **kw):
        texts = [t.get_text() for t in fig.texts]
        for ax in fig.axes:
            texts += [ax.get_title(), ax.get_ylabel()]
        seen[os.path.basename(str(path))] = " ".join(" | ".join(t for t in texts if t).split())  # unwrapped
        return save(fig, path, *args, **kw)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return seen
