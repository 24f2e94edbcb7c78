"""convert_model: per-instance swap of nn.Linear for ArmorLinear, with a report."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from armor_runtime.convert import armor_layers, convert_model
from armor_runtime.linear import ArmorLinear


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_converted_model_equals_dense_w_hat_model_and_generates(family, make_converted, input_ids):
    import transformers

    model, report = make_converted(family)
    assert len(report.converted) == 14 and not report.skipped  # 7 projections x 2 layers
    assert not isinstance(model.lm_head, ArmorLinear)
    with torch.inference_mode():
        logits = model(input_ids).logits
    # the same model with W_hat written into plain nn.Linear layers
    dense = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    sd = {k: v for k, v in model.state_dict().items()}
    for name, layer in armor_layers(model).items():
        for key in ("a", "values", "meta", "b", "bias"):
            sd.pop(f"{name}.{key}", None)
        sd[f"{name}.weight"] = layer.to_dense()
        if layer.bias is not None:
            sd[f"{name}.bias"] = layer.bias
    dense.load_state_dict(sd)
    with torch.inference_mode():
        torch.testing.assert_close(logits, dense(input_ids).logits, rtol=1e-4, atol=1e-4)
    out = model.generate(input_ids[:1], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 17)
    assert torch.equal(out, dense.generate(input_ids[:1], max_new_tokens=6, do_sample=False))


def test_report_skips_with_reasons(make_tiny_config, make_armor_weights):
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    q = model.model.layers[0].self_attn.q_proj
    up = model.model.layers[0].mlp.up_proj
    weights = {
        "model.layers.0.self_attn.q_proj": make_armor_weights(q),
        "model.layers.0.self_attn.k_proj": make_armor_weights(q),  # 64x64 weights for a 32x64 layer
        "model.layers.0.input_layernorm": make_armor_weights(q),
        "model.layers.9.mlp.up_proj": make_armor_weights(up),
    }
    report = convert_model(model, weights)
    assert report.converted == ["model.layers.0.self_attn.q_proj"]
    assert "shape mismatch" in report.skipped["model.layers.0.self_attn.k_proj"]
    assert "not an nn.Linear" in report.skipped["model.layers.0.input_layernorm"]
    assert "no such module" in report.skipped["model.layers.9.mlp.up_proj"]
    assert "no ArmorWeights" in report.skipped["model.layers.1.mlp.down_proj"]
    assert "lm_head" not in report.skipped
    assert 0 < report.armor_bytes and report.dense_bytes == 64 * 64 * 4
    assert "converted 1 linear layers" in report.summary()


def test_dense_weight_is_freed_on_replacement(make_tiny_config, make_armor_weights):
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(make_tiny_config("llama")).eval()
    name = "model.layers.1.mlp.down_proj"
    old = model.get_submodule(name)
    weights = {name: make_armor_weights(old)}
    ref = weakref.ref(old.weight)
    del old
    convert_model(model, weights)
    gc.collect()
    assert ref() is None  # nothing keeps the dense weight alive
    new = model.get_submodule(name)
    assert isinstance(new, ArmorLinear)
    assert all(t.shape != (64, 96) for t in new.state_dict().values())


def test_weights_are_cast_to_the_layer_dtype(make_tiny_config, make_armor_weights):
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(make_tiny_config("qwen2")).to(torch.bfloat16).eval()
    name = "model.layers.0.self_attn.v_proj"
    w = make_armor_weights(copy.deepcopy(model.get_submodule(name)).float())  # fp32 factors, bias included
    convert_model(model, {name: w})
    layer = model.get_submodule(name)
    assert layer.values.dtype == torch.bfloat16 and layer.meta.dtype == torch.uint8
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
