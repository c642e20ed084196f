from __future__ import annotations

import json

import pytest

from onnxqat.config import PRESETS, QuantSimConfig, load_config
from onnxqat.errors import ConfigError

AIMET_STYLE = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "False"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "strict_symmetric": "False",
        "unsigned_symmetric": "True",
        "per_channel_quantization": "True",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"Squeeze": {"is_output_quantized": "False"}, "Gemm": {"per_channel_quantization": "False"}},
    "supergroups": [{"op_list": ["Conv", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.supergroups and ("Conv", "Relu") in cfg.supergroups


def test_default_is_onnxruntime_preset():
    cfg = load_config(None)
    assert cfg == load_config("onnxruntime")
    assert cfg.output_quantized is False and cfg.output_quantized_for("Conv") is True
    assert cfg.input_quantized_for("MatMul") and not cfg.input_quantized_for("Erf")


def test_aimet_file_with_string_booleans(tmp_path):
    path = tmp_path / "aimet.json"
    path.write_text(json.dumps(AIMET_STYLE))
    cfg = load_config(path)
    assert cfg.per_channel_quantization is True
    assert cfg.per_channel_for("Gemm") is False and cfg.per_channel_for("Conv") is True
    assert cfg.param_rule("Conv", "bias") == (False, True)
    assert cfg.output_quantized_for("Squeeze") is False


def test_round_trip_through_dict():
    cfg = load_config("aimet")
    assert QuantSimConfig.from_dict(cfg.to_dict()) == cfg
    cfg2 = QuantSimConfig.from_dict(
        {"nodes": {"conv1": {"activation_bw": 16, "param_bw": 16}}, "exclude": {"op_types": ["LSTM"]}}
    )
    assert QuantSimConfig.from_dict(cfg2.to_dict()) == cfg2


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"defaults": {"opps": {}}}, r"defaults: unknown key\(s\) \['opps'\]"),
        ({"defaults": {"ops": {"is_output_quantized": "yes"}}}, "expected true/false"),
        ({"supergroups": [{"op_list": ["Conv"]}]}, "two or more"),
        ({"nodes": {"c": {"activation_bw": 3}}}, "bitwidth from 4 to 16"),
        ({"nodes": {"c": {"activation_bw": True}}}, "bitwidth from 4 to 16"),
        ({"exclude": {"nodes": "conv1"}}, "list of strings"),
        ([], "expected an object"),
    ],
)
def test_invalid_configs_name_the_key(doc, message):
    with pytest.raises(ConfigError, match=message):
        QuantSimConfig.from_dict(doc)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_onnxqat_keys_for_aimet_placement_are_validated_and_round_trip():
    cfg = QuantSimConfig.from_dict({"defaults": {"depthwise_supergroups": "False", "tied_op_types": ["Relu"],
                                                 "calibrate_quantized_weights": True}})
    assert not cfg.depthwise_supergroups and cfg.tied_op_types == {"Relu"} and cfg.calibrate_quantized_weights
    assert QuantSimConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="defaults.tied_op_types: expected a list of op types"):
        QuantSimConfig.from_dict({"defaults": {"tied_op_types": "Relu"}})
    with pytest.raises(ConfigError, match="depthwise_supergroups"):
        QuantSimConfig.from_dict({"defaults": {"depthwise_supergroups": "sometimes"}})
    plain = load_config("onnxruntime")
    assert plain.depthwise_supergroups and not plain.tied_op_types and not plain.calibrate_quantized_weights


def test_api_config_names_that_match_nothing_are_errors_with_the_closest_name():
    """The Python API refuses what the CLI refuses: a typo in exclude.nodes or nodes would
    otherwise silently do nothing."""
    from conftest import tiny_cnn

    from onnxqat import QuantizationSimModel
    from onnxqat.errors import ConfigError

    with pytest.raises(ConfigError, match=r"exclude.nodes: no node named 'conv_1' in the model \(closest: 'conv1'\)"):
        QuantizationSimModel(tiny_cnn(), config={"exclude": {"nodes": ["conv_1"]}})
    with pytest.raises(ConfigError, match=r"nodes: no node named 'fcc'.*closest: 'fc'"):
        QuantizationSimModel(tiny_cnn(), config={"nodes": {"fcc": {"param_bw": 4}}})
    sim = QuantizationSimModel(tiny_cnn(), config={"exclude": {"nodes": ["dwconv"]}})  # a real name works
    assert "w2" not in {p.name for p in sim.plan.params}  # dwconv's weight stays float
