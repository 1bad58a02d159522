import pytest
import torch

import sagequant as sq
from sagequant.evaluation.contributions import (_OnlySome, format_contributions, layer_contributions,
                                                unit_of)
from sagequant.evaluation.error_report import _unfused

BROKEN = "model.layers.1.mlp.up_proj"


def test_unit_of():
    assert unit_of("model.layers.3.mlp.up_proj", "block") == "model.layers.3"
    assert unit_of("transformer.h.11.attn.c_attn", "block") == "transformer.h.11"
    assert unit_of("lm_head", "block") == "lm_head"
    assert unit_of("model.layers.3.mlp.up_proj", "linear") == "model.layers.3.mlp.up_proj"


@pytest.mark.parametrize("calibration", ["smoothquant", "awq"])
def test_no_unit_quantized_is_the_float_model(tiny, compiled, eval_ids, calibration):
    """With every quantized layer standing in for its float layer, the folded graph (norm weights
    divided by SmoothQuant / AWQ scales, consumers' columns multiplied) gives the float logits."""
    act = "int8" if calibration == "smoothquant" else "a16"
    cm = compiled("gemma3", weight_dtype="int4" if act == "a16" else "int8", activation_dtype=act,
                  calibration=calibration, group_size=None if act == "int8" else 32, guard="off")
    model = tiny("gemma3")
    ids = eval_ids[:1]
    got = _OnlySome(_unfused(cm.graph), model, keep=set()).run(ids)
    with torch.inference_mode():
        want = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # ...and with every layer kept it is the compiled model itself
    all_layers = {cm.graph.annotation(n).layer for n in cm.graph.annotated()}
    torch.testing.assert_close(_OnlySome(_unfused(cm.graph), model, all_layers).run(ids), cm(ids))


def test_broken_layer_dominates_its_block_and_the_linear_table(tiny, calib_ids, eval_ids):
    cfg = sq.QuantConfig(weight_dtype="int8", group_size=None, guard="off",
                         overrides={BROKEN: {"weight_dtype": "int4", "clip_ratio": 0.05}})
    model = tiny("llama")
    cm = sq.compile(model, cfg, calibration_data=calib_ids)
    batches = [eval_ids[:1], eval_ids[1:]]
    blocks = layer_contributions(cm.graph, model, batches, unit="block")
    assert [r["unit"] for r in blocks["rows"]] == ["model.layers.1", "model.layers.0"]
    assert blocks["rows"][0]["share"] > 0.9 and blocks["rows"][0]["layers"] == 7
    assert blocks["sum_kl"] == pytest.approx(sum(r["kl"] for r in blocks["rows"]))
    linears = layer_contributions(cm.graph, model, batches, unit="linear")
    assert len(linears["rows"]) == 14 and linears["rows"][0]["unit"] == BROKEN
    top = linears["rows"][0]
    assert top["worst_local_sqnr_db"] < 10 < linears["rows"][1]["worst_local_sqnr_db"]
    # the whole model's KL is what its own forward gives against the float model
    assert linears["whole"]["kl"] >= top["kl"] > 0
    assert BROKEN in format_contributions(linears, top=3)


def test_bad_unit(tiny, compiled, eval_ids):
    with pytest.raises(ValueError, match="valid: block, linear"):
        layer_contributions(compiled(weight_dtype="int8", group_size=None).graph, tiny("llama"),
                            [eval_ids[:1]], unit="layer")
