import pytest

from impact_core.config import Config, ConfigError, as_sparsity_list, load_config


def test_presets_load():
    for name in ("smoke", "default", "paper"):
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.model.depth == 12  # blocks 2 / 7 / 11 keep their meaning


def test_unknown_key_is_named_with_hint():
    with pytest.raises(ConfigError, match=r"unknown config key 'pruning.sparsites' \(did you mean 'pruning.sparsities'"):
        load_config("smoke", {"pruning.sparsites": [0.5]})
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        Config.from_dict({"modle": {}})


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", True])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ConfigError, match="pruning.sparsities"):
        load_config("smoke", {"pruning.sparsities": bad})


def test_sparsity_accepts_float_or_list():
    assert as_sparsity_list(0.7, "x") == [0.7]
    assert as_sparsity_list([0, 0.5], "x") == [0.0, 0.5]
    assert load_config("smoke", {"neuron.sparsities": 0.3}).neuron.sparsities == [0.3]


def test_invalid_values_name_their_key():
    with pytest.raises(ConfigError, match="model.embed_dim"):
        load_config("smoke", {"model.embed_dim": 30, "model.num_heads": 4})
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config("smoke", {"data.batch_size": 0})
    with pytest.raises(ConfigError, match="pruning.methods"):
        load_config("smoke", {"pruning.methods": ["sparsegpt"]})
    with pytest.raises(ConfigError, match="unknown preset 'smok'"):
        load_config("smok")


def test_env_paths(monkeypatch):
    monkeypatch.setenv("IMPACT_IMAGENET", "/data/imagenet")
    monkeypatch.setenv("IMPACT_DEIT3_CHECKPOINT", "/w/deit3.pth")
    cfg = load_config("paper")
    assert cfg.data.root == "/data/imagenet" and cfg.model.checkpoint == "/w/deit3.pth"
    monkeypatch.setenv("IMPACT_DATA_ROOT", "/elsewhere")
    assert load_config("smoke").data.root == "/elsewhere"


def test_seeds_preset_extends_default():
    cfg = load_config("seeds")
    base = load_config("default")
    assert cfg.seeds == [0, 1, 2] and cfg.seed == 0 and cfg.name == "seeds"
    assert cfg.model == base.model and cfg.pruning == base.pruning
    with pytest.raises(ConfigError, match="seeds"):
        load_config("default", {"seeds": []})
