"""Complete cache keys: every config field an artefact's computation reads is in its key.

For each cached kind, the fields are found by reading the source of the function that computes
it and of the helpers it passes the config to (``cfg.<section>.<field>``, and a section bound to
a name, ``a = cfg.attribution`` then ``a.<field>``). Each field is changed in turn and the key
must change; the few fields that cannot change a number, or are in the key in another form, are
listed in :data:`NOT_CHECKED` with the reason."""
from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from impact_core import models, pipeline
from impact_core.config import load_config
from impact_core.levels import circuit, layer, model, neuron

NOT_CHECKED = {
    "data.root": "where the files lie; the data kind and the image counts identify the data",
    "data.num_workers": "loader processes only; the batches are the same (tests/test_data.py)",
    "neuron.sparsities": "which models the chapter analyses, not how one is analysed",
    "circuit.sparsities": "which models the chapter analyses, not how one is analysed",
    "attribution.sparsities": "which models the chapter analyses, not how one is analysed",
    "sae.sparsities": "which models the chapter analyses, not how one is analysed",
    "circuit.k_sweep": "which k the chapter sweeps; the k of an entry is in its key",
    "circuit.k_dense": "chooses the k of an entry, and the k is in its key",
    "circuit.k_sparse": "chooses the k of an entry, and the k is in its key",
    "circuit.classes": "resolved to the class list, which is in the key",
    "sae.seeds": "how many SAEs a model gets; each SAE's own seed is in its key",
    "sae.sweep": "which SAEs the sweep trains; each SAE's tokens, k and expansion are in its key",
    "sae.sweep_k": "which SAEs the sweep trains; each SAE's k is in its key",
    "sae.sweep_expansion": "which SAEs the sweep trains; each SAE's expansion is in its key",
    "sae.block": "resolved to the block index, which is in the key",
    "sae.tokens": "the default token set; an SAE's tokens are in its key",
    "sae.k": "the default k; an SAE's k is in its key",
    "sae.expansion": "the default expansion; an SAE's expansion is in its key",
    "sae.buffer_max_mb": "memory of the training stream only (tests/test_sae.py: same SAE bit for bit)",
    "sae.cache_activations_mb": "whether activation sets are stored; the SAE is equal (tests/test_sae.py)",
    "sae.pool_batches": "memory of the streamed pool only",
    "model.checkpoint": "identified by its path, size and time in the dense model's key",
    "model.arch": "in the key with the whole model section (model.to_dict()); another registered "
                  "architecture is loaded from a checkpoint, not trained, so it cannot be swapped here",
}

# kind -> (function that computes it, helpers it hands the config to, key of one entry)
KINDS = {
    "dense_model": (pipeline.dense_model, [models.train_dense], lambda c: pipeline.dense_inputs(c)),
    "pruned_model": (pipeline.pruned_model, [], lambda c: pipeline.pruned_inputs(c, 0.7, "wanda")),
    "accuracy": (pipeline.accuracy, [], lambda c: pipeline.accuracy_inputs(c, 0.7)),
    "site_means": (pipeline.site_means, [], lambda c: pipeline.site_means_inputs(c, 0.7)),
    "neuron_metrics": (neuron.neuron_metrics, [neuron.metric_images], lambda c: neuron.neuron_inputs(c, 0.7)),
    "attribution_results": (model.attribution_results, [model.evaluation_positions],
                            lambda c: model.attribution_inputs(c, 0.7)),
    "circuits": (circuit.circuit_results, [circuit.resolve_classes], lambda c: circuit.circuit_inputs(c, 0.7, 4e-5)),
    "sae": (layer.train_sae, [layer.sae_settings], lambda c: layer.sae_inputs(c, 0.7, "cls", 4, 4)),
}


def reads(functions, cfg=None) -> set[str]:
    """``section.field`` names the functions' source reads from the config; a section handed on
    whole (``score_chunk(..., a, ...)``) counts as every field of it read."""
    cfg = cfg or load_config("smoke")
    out = set()
    for f in functions:
        src = inspect.getsource(f)
        out |= {f"{a}.{b}" for a, b in re.findall(r"\bcfg\.([a-z_]+)\.([a-z_]+)\b", src)}
        for alias, section in re.findall(r"\b([a-z]{1,2}) = cfg\.([a-z_]+)\s*$", src, re.M):
            out |= {f"{section}.{b}" for b in re.findall(rf"\b{alias}\.([a-z_]+)\b", src)}
            if re.search(rf"[(,]\s*{alias}\s*[,)]", src):
                out |= {f"{section}.{fl.name}" for fl in dataclasses.fields(getattr(cfg, section))}
    return {r for r in out if not r.endswith((".to_dict", ".get"))}


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.01
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else value + value
    if value is None:
        return 7
    raise TypeError(value)


def with_field(cfg, name: str):
    section, field = name.split(".")
    sec = getattr(cfg, section)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sec, **{field: changed(getattr(sec, field))})})


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_field_the_computation_reads_is_in_the_key(kind):
    compute, helpers, inputs = KINDS[kind]
    cfg = load_config("smoke")
    cache = pipeline.cache_for(cfg)
    fields = sorted(reads([compute, *helpers]) - set(NOT_CHECKED))
    assert fields, kind
    base = cache.key(kind, inputs(cfg))
    missing = [f for f in fields if cache.key(kind, inputs(with_field(cfg, f))) == base]
    assert not missing, f"{kind}: the key ignores {missing}"
    # and the seed, which every stochastic stage reads
    assert cache.key(kind, inputs(dataclasses.replace(cfg, seed=cfg.seed + 1))) != base


def test_the_scan_finds_what_a_computation_reads():
    assert {"attribution.batch_size", "data.batch_size", "attribution.steps"} <= reads([model.attribution_results])
    assert "attribution.images" in reads([model.evaluation_positions])
    assert {"train.lr", "train.epochs", "train.batch_size"} <= reads([models.train_dense])
    assert "data.batch_size" in reads([pipeline.accuracy])
