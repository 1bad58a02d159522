"""Catalogue, API: bad QuantConfigs (ConfigError naming the field and the valid values), unusable
calibration data (CalibrationDataError naming the item, file or id), and output paths whose files
sagequant did not write (OutputPathError; nothing lost), for save and every exporter."""
from __future__ import annotations

import pytest
import torch

import sagequant as sq
from sagequant.calibration.datasets import CalibrationDataError, as_token_batches, load_texts
from sagequant.errors import ConfigError, ExportError, SageQuantError
from sagequant.safe_write import OutputPathError

CONFIGS = {
    "weight dtype": (dict(weight_dtype="int3"), "weight_dtype='int3'"),
    "group size zero": (dict(group_size=0), "group_size=0"),
    "group size negative": (dict(group_size=-5), "group_size=-5"),
    "group size as text": (dict(group_size="128"), "group_size"),
    "clip ratio above one": (dict(clip_ratio=1.5), "clip_ratio=1.5"),
    "clip ratio nan": (dict(clip_ratio=float("nan")), "clip_ratio=nan"),
    "calibration method": (dict(calibration="bogus"), "calibration='bogus'"),
    "backend": (dict(backend="tpu"), "backend='tpu'"),
    "priority": (dict(priority="fast"), "priority='fast'"),
    "misspelt field": (dict(wieght_dtype="int4"), "'wieght_dtype'"),
    "kv cache dtype": (dict(kv_cache_dtype="int2"), "kv_cache_dtype='int2'"),
    "contradictory dtypes": (dict(weight_dtype="fp8", activation_dtype="int8"), "contradicts"),
    "zero samples": (dict(calibration_samples=0), "calibration_samples=0"),
    "scale precision": (dict(scale_precision="fp64"), "scale_precision='fp64'"),
    "fp8 format": (dict(fp8_format="e3m4"), "fp8_format='e3m4'"),
    "bool as text": (dict(symmetric="yes"), "symmetric='yes'"),
    "ignore not a list": (dict(ignore="lm_head"), "ignore='lm_head'"),
    "guard mode": (dict(guard="maybe"), "guard='maybe'"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_names_the_field(case):
    fields, words = CONFIGS[case]
    with pytest.raises(ConfigError) as info:
        sq.QuantConfig.from_dict(fields)
    assert type(info.value) is ConfigError and words in str(info.value) and "valid" in str(info.value)


def test_unknown_pass_names_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="stop_after='nope'.*canonicalize"):
        sq.compile(tiny("llama"), sq.QuantConfig(guard="off"), stop_after="nope")
    with pytest.raises(ConfigError, match="print_ir_after: 'nope'.*canonicalize"):
        sq.compile(tiny("llama"), sq.QuantConfig(guard="off"), print_ir_after=["nope"])
    with pytest.raises(ConfigError, match="stop_after='gptq': that pass is not in this pipeline"):
        sq.compile(tiny("llama"), sq.QuantConfig(guard="off"), stop_after="gptq")  # minmax: no gptq


def test_inference_token_outside_the_vocabulary(compiled):
    with pytest.raises(CalibrationDataError, match=r"token id 999 is outside the vocabulary \(vocab_size 128"):
        compiled("llama", group_size=32)(torch.tensor([[1, 999]]))


@pytest.mark.parametrize("kwargs, words", [(dict(max_new_tokens=0), "max_new_tokens=0"),
                                           (dict(temperature=-1.0), "temperature=-1.0"),
                                           (dict(top_p=0.0), "top_p=0.0")])
def test_generation_request_outside_its_ranges(compiled, kwargs, words):
    from sagequant.runtime.engine import GenerationError
    with pytest.raises(GenerationError) as info:
        compiled("llama", group_size=32).generate(torch.tensor([[1, 2, 3]]), **kwargs)
    assert type(info.value) is GenerationError and words in str(info.value)


def test_perplexity_of_too_little_text():
    from sagequant.evaluation.perplexity import perplexity
    with pytest.raises(CalibrationDataError, match="window=1 must be >= 2"):
        perplexity(lambda ids: ids, torch.arange(10), window=1)


CALIBRATION = {
    "empty list": ([], "empty"),
    "float tensor": (torch.rand(2, 8), "integers"),
    "3-D tensor": (torch.zeros(1, 2, 3, dtype=torch.long), "1-D or 2-D"),
    "negative id": (torch.tensor([[1, -3, 2]]), "negative token id -3"),
    "empty tensor": (torch.zeros(1, 0, dtype=torch.long), "empty tensor"),
    "mixed list": (["text", torch.tensor([1, 2])], "item 0"),
    "not data at all": (42, "unsupported type int"),
    "text without tokenizer": (["some text"], "tokenizer is required"),
}


@pytest.mark.parametrize("case", list(CALIBRATION))
def test_unusable_calibration_data(case):
    data, words = CALIBRATION[case]
    with pytest.raises(CalibrationDataError) as info:
        as_token_batches(data, None, 2, 8)
    assert type(info.value) is CalibrationDataError and words in str(info.value)


def test_out_of_vocabulary_token_id_names_the_id_and_the_vocabulary(tiny):
    with pytest.raises(CalibrationDataError, match=r"token id 500 is outside.*vocab_size 128"):
        sq.compile(tiny("llama"), sq.QuantConfig(guard="off"),
                   calibration_data=[torch.tensor([[1, 2, 500, 3]])])


@pytest.mark.parametrize("content, words", [
    (bytes(range(256)), "not UTF-8 text (byte 0x80 at offset 128)"),
    (b"ok\x00", "NUL bytes"),
    (b"", "no usable text"),
    (b'{"text": "a"}\n{broken\n', ":2: not valid JSON"),
    (b'{"text": 5}\n', "no string 'text' field"),
])
def test_unusable_dataset_file_names_the_file(tmp_path, content, words):
    path = tmp_path / ("data.jsonl" if content.startswith(b"{") else "data.txt")
    path.write_bytes(content)
    with pytest.raises(CalibrationDataError) as info:
        load_texts(path)
    assert path.name in str(info.value) and words in str(info.value)


# ---- outputs: never lose a file sagequant did not write -------------------------------------------

@pytest.fixture(scope="module")
def cm(compiled):
    return compiled("llama", group_size=32)


@pytest.fixture
def foreign(tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return d


def _refused(fn, *words):
    with pytest.raises(OutputPathError) as info:
        fn()
    assert type(info.value) is OutputPathError
    for w in words:
        assert w in str(info.value), str(info.value)


def test_save_onto_a_file_is_refused_even_with_overwrite(cm, tmp_path):
    f = tmp_path / "model"
    f.write_text("a file")
    _refused(lambda: cm.save(f), "is a file")
    _refused(lambda: cm.save(f, overwrite=True), "is a file")
    assert f.read_text() == "a file"


def test_save_onto_a_symbolic_link_is_refused(cm, foreign, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(foreign, target_is_directory=True)
    _refused(lambda: cm.save(link, overwrite=True), "symbolic link")
    assert link.is_symlink() and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_save_into_foreign_files_needs_overwrite_and_keeps_them(cm, foreign):
    _refused(lambda: cm.save(foreign), "notes.txt", "overwrite=True")
    cm.save(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine" and sq.load(foreign).config == cm.config
    cm.save(foreign, overwrite=True)  # again over our own files (and theirs): still both
    assert sorted(p.name for p in foreign.iterdir()) == sorted(
        ["notes.txt", "manifest.json", "graph.json", "weights.safetensors", "meta.json"])


def test_onnx_export_over_an_existing_file(cm, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("earlier")
    _refused(lambda: cm.export(out), "m.onnx", "already exists")
    assert out.read_text() == "earlier"


def test_onnx_export_onto_a_directory(cm, foreign):
    _refused(lambda: cm.export(foreign), "is a directory")


def test_onnx_export_with_a_stale_external_data_file(cm, tmp_path):
    (tmp_path / "m.onnx.data").write_text("someone's")
    _refused(lambda: cm.export(tmp_path / "m.onnx"), "m.onnx.data")


def test_compressed_tensors_export_into_foreign_files(cm, foreign):
    _refused(lambda: cm.export(foreign, format="compressed-tensors"), "checkpoint", "notes.txt")


def test_tensorrt_engine_path_over_an_existing_file(cm, tmp_path):
    (tmp_path / "m.plan").write_text("an engine")
    _refused(lambda: cm.export(tmp_path / "m.onnx", format="tensorrt", engine_path=tmp_path / "m.plan"),
             "TensorRT engine", "m.plan")


def test_scheduler_ir_over_an_existing_file(cm, tmp_path):
    (tmp_path / "s.json").write_text("{}")
    _refused(lambda: cm.export_scheduler_ir(tmp_path / "s.json"), "scheduler IR")
    cm.export_scheduler_ir(tmp_path / "s.json", overwrite=True)
    assert (tmp_path / "s.json").read_text() != "{}"


def test_html_report_over_a_file_it_did_not_write(cm, foreign):
    from sagequant.evaluation.html_report import write_html_report
    (foreign / "report.html").write_text("<html>the user's page</html>")
    _refused(lambda: write_html_report(cm, foreign, None, None), "HTML report", "report.html")
    assert (foreign / "report.html").read_text() == "<html>the user's page</html>"
    ours = write_html_report(cm, foreign / "ours.html", None, None)
    assert write_html_report(cm, ours, None, None) == ours  # an earlier sagequant report: replaced
    assert (foreign / "notes.txt").read_text() == "mine"


def test_ir_dump_into_foreign_files(tiny, foreign):
    _refused(lambda: sq.compile(tiny("llama"), sq.QuantConfig(guard="off"), dump_dir=foreign),
             "IR dump", "notes.txt")


@pytest.mark.parametrize("options, words", [
    (dict(format="gguf"), "format='gguf'"),
    (dict(weight_format="awq"), "weight_format='awq'"),
    (dict(format="onnx", engine_path="e.plan"), "engine_path is for format='tensorrt'"),
    (dict(format="tensorrt", weight_format="matmulnbits"), "TensorRT does not read"),
    (dict(tokenizer=object()), "tokenizer= is for format='compressed-tensors'"),
])
def test_export_options_outside_what_the_format_supports(cm, tmp_path, options, words):
    with pytest.raises(ExportError) as info:
        cm.export(tmp_path / "x.onnx", **options)
    assert type(info.value) is ExportError and words in str(info.value)


def test_every_user_error_is_a_sagequant_error():
    """The family: each area class and each module's own class derives from SageQuantError."""
    from sagequant.calibration.awq import AWQError
    from sagequant.calibration.gptq import GPTQError
    from sagequant.ir.trace import TraceError
    from sagequant.lowering.registry import KernelNotFoundError
    from sagequant.passes.guard import AccuracyGuardError
    from sagequant.serving.state import EngineStateError
    for cls in (ConfigError, CalibrationDataError, ExportError, OutputPathError, AWQError, GPTQError,
                TraceError, KernelNotFoundError, AccuracyGuardError, EngineStateError, sq.ArtifactError):
        assert issubclass(cls, SageQuantError), cls
    assert issubclass(GPTQError, ValueError) and issubclass(TraceError, RuntimeError)  # old bases kept
