import json

import pytest
import torch

from tsds_interp.model import CheckpointError, ModelConfig, build_model, load, save


def test_save_load_round_trip_identical_logits(random_model, tmp_path):
    tokens = torch.randint(0, 17, (3, random_model.tsds_config.n_ctx))
    save(random_model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    assert torch.equal(random_model(tokens), loaded(tokens))
    assert loaded.tsds_config == random_model.tsds_config
    assert not list(tmp_path.glob(".ck*"))  # no temp folder left


def test_same_seed_same_weights(tiny_cfg):
    a, b = build_model(tiny_cfg), build_model(tiny_cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder or shipped checkpoint named"):
        load(tmp_path / "nope")


def test_wrong_files(random_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path / "empty")
    save(random_model, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(tmp_path / "ck")


def test_vocab_mismatch(random_model, tmp_path):
    save(random_model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["vocab"] = meta["vocab"][:-1]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="another vocabulary"):
        load(tmp_path / "ck")


def test_shape_mismatch(random_model, tmp_path):
    save(random_model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"]["d_mlp"] = 96
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has shape"):
        load(tmp_path / "ck")


def test_bad_model_config():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(d_model=30, n_heads=4)


def test_save_replaces_atomically(random_model, tmp_path):
    save(random_model, tmp_path / "ck")
    save(random_model, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_grow_adds_blocks_without_changing_the_function(tiny_cfg):
    from tsds_interp.model import grow
    from tsds_interp.rollout import rollout
    from tsds_interp.task import sample_questions

    random_model = build_model(tiny_cfg)
    with torch.no_grad():
        for p in random_model.parameters():  # nonzero everywhere, so a leak through any new block shows
            p.add_(0.01)
    bigger = grow(random_model, 2, seed=3)
    assert bigger.cfg.n_layers == random_model.cfg.n_layers + 2
    task = random_model.tsds_config.task
    q = sample_questions(task, "test", 16, seed=0)
    tokens = rollout(random_model, q, seed=1).tokens
    assert torch.equal(random_model(tokens), bigger(tokens))
    assert torch.equal(rollout(bigger, q, seed=1).tokens, tokens)
    new = [k for k in bigger.state_dict() if k.startswith(f"blocks.{random_model.cfg.n_layers}.")]
    assert any(bigger.state_dict()[k].abs().sum() > 0 for k in new)  # the new blocks are not all zero
