import json

import pytest

from cartformer.config import DataConfig, RunConfig


def test_config_round_trip(tmp_path):
    cfg = RunConfig(data_path="x.parquet", out_dir="runs/a")
    cfg.model.embedding_dim = 32
    cfg.finetune.lr = 3e-4
    cfg.data.excluded_surfaces = ("ST_Catalog", "ST_Other")
    path = tmp_path / "config.json"
    cfg.save(path)
    loaded = RunConfig.load(path)
    assert loaded == cfg
    assert isinstance(loaded.data.excluded_surfaces, tuple)


def test_config_defaults_match_method():
    cfg = RunConfig()
    assert cfg.model.embedding_dim == 64
    assert cfg.model.num_heads == 2
    assert cfg.model.num_layers == 2
    assert cfg.model.dropout == 0.1
    assert cfg.model.max_seq_len == 512
    assert cfg.pretrain.lr == 1e-3
    assert cfg.pretrain.weight_decay == 0.01
    assert cfg.pretrain.warmup_epochs == 3
    assert cfg.pretrain.warmup_start_factor == 0.1
    assert cfg.data == DataConfig()
    assert cfg.data.min_history == 5


def test_config_rejects_unknown_key(tmp_path):
    payload = RunConfig().to_dict()
    payload["model"]["embeding_dim"] = 16
    path = tmp_path / "config.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="embeding_dim"):
        RunConfig.load(path)
