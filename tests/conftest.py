"""Tiny random transformers models shared by the compiler tests.

Builders are deterministic (own RNG seed) and perturb every 1-D parameter (norm weights, biases)
so a pass that drops a norm scale, a Gemma (1 + w) offset or a bias changes the logits.
Traced graphs and models are cached per session; `traced` hands out deep copies, because passes
rewrite graphs in place.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import sagequant

VOCAB = 128
# Hidden 80 with group 32 gives ragged groups (32, 32, 16); intermediate 99 is odd, so packed
# int4 rows need a padding nibble and down_proj has groups (32, 32, 32, 3).
RAGGED = dict(hidden_size=80, intermediate_size=99, head_dim=16)


def _llama_like(config_cls, model_cls, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base.update(kw)
    return model_cls(config_cls(**base))


def _build(arch: str, **kw) -> torch.nn.Module:
    import transformers as tf
    if arch == "llama":
        return _llama_like(tf.LlamaConfig, tf.LlamaForCausalLM, **kw)
    if arch == "qwen2":
        return _llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM, **kw)
    if arch == "mistral":
        return _llama_like(tf.MistralConfig, tf.MistralForCausalLM, **kw)
    if arch == "gemma3":
        kw.setdefault("head_dim", 16)
        return _llama_like(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, **kw)
    if arch == "gpt2":
        base = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        base.update(kw)
        return tf.GPT2LMHeadModel(tf.GPT2Config(**base))
    raise ValueError(f"unknown tiny arch {arch!r}")


def build_tiny(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _build(arch, **kw).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """Tiny GEMMs gain nothing from intra-op threads, and on a loaded 2-core box the OpenMP
    hand-off costs ~10 ms per op (0.2 s per forward instead of 1 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_MODELS: dict = {}
_TRACED: dict = {}


def _key(arch, kw):
    return (arch, tuple(sorted(kw.items())))


@pytest.fixture(scope="session")
def tiny():
    """tiny(arch, **config_overrides) -> a cached eval-mode model (do not mutate it)."""
    def get(arch: str, **kw):
        key = _key(arch, kw)
        if key not in _MODELS:
            _MODELS[key] = build_tiny(arch, **kw)
        return _MODELS[key]
    return get


def _fingerprint() -> dict:
    return {key: [p.detach().clone() for p in m.state_dict().values()] for key, m in _MODELS.items()}


@pytest.fixture(autouse=True)
def _shared_models_stay_unchanged():
    """The session's tiny models are shared by every test: one that mutates them makes later
    tests' results depend on test order (which xdist changes), so name the mutating test."""
    before = _fingerprint()
    yield
    for key, tensors in before.items():
        after = list(_MODELS[key].state_dict().values())
        changed = [i for i, (a, b) in enumerate(zip(tensors, after)) if not torch.equal(a, b)]
        assert not changed, f"this test mutated the shared tiny model {key} (tensors {changed})"


@pytest.fixture(scope="session")
def fresh_tiny():
    """fresh_tiny(arch, **config_overrides) -> a new model the test may modify."""
    return build_tiny


@pytest.fixture(scope="session")
def traced(tiny):
    """traced(arch, **config_overrides) -> (model, a private deep copy of its traced QuantGraph)."""
    from sagequant.ir.trace import trace_model

    def get(arch: str, **kw):
        key = _key(arch, kw)
        model = tiny(arch, **kw)
        if key not in _TRACED:
            _TRACED[key] = trace_model(model)
        return model, copy.deepcopy(_TRACED[key])
    return get


@pytest.fixture(scope="session")
def calib_ids():
    """Calibration token ids [4, 16] (one [1, 16] batch per row), fixed seed."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (4, 16), generator=g)


@pytest.fixture(scope="session")
def eval_ids():
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, VOCAB, (2, 11), generator=g)


@pytest.fixture(scope="session")
def compiled(tiny, calib_ids):
    """compiled(arch="llama", model_kw=None, **QuantConfig kwargs) -> a cached CompiledModel,
    calibrated on calib_ids. Shared across tests: only call, save, report or inspect it."""
    import json

    cache: dict = {}

    def get(arch: str = "llama", model_kw: dict | None = None, **cfg_kw):
        key = (_key(arch, model_kw or {}), json.dumps(cfg_kw, sort_keys=True))
        if key not in cache:
            cfg = sagequant.QuantConfig(**cfg_kw)
            cache[key] = sagequant.compile(tiny(arch, **(model_kw or {})), cfg, calibration_data=calib_ids)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def helpers():
    """Small helpers tests cannot import from conftest under --import-mode=importlib."""
    class H:
        RAGGED = RAGGED
        VOCAB = VOCAB
        build_tiny = staticmethod(build_tiny)

        @staticmethod
        def float_inputs(model, module, rows) -> torch.Tensor:
            """What `module` of the float `model` reads, one forward per row of `rows`, concatenated."""
            inputs = []
            hook = module.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
            try:
                with torch.no_grad():
                    for row in rows:
                        model(input_ids=row[None], use_cache=False)
            finally:
                hook.remove()
            return torch.cat(inputs)
    return H


@pytest.fixture(scope="session")
def benchmark_module():
    """benchmarks/NAME.py loaded as a module (benchmarks/ is not a package; its scripts import
    their neighbours, so that folder goes on sys.path)."""
    import importlib.util
    import sys
    folder = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        sys.path.insert(0, str(folder))
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint directory with the real SmolLM2 tokenizer (vocab sized to match),
    for tests that go through model names, tokenizers and chat templates (CLI, server)."""
    from sagequant.frontends.models import resolve_tokenizer
    tok = resolve_tokenizer("smollm2")
    d = tmp_path_factory.mktemp("tiny-checkpoint")
    build_tiny("llama", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


CHECKPOINT_WORDS = ("the cat sat on a mat and dog ran to park while bird sang in tree near river " * 3).split()


def write_word_checkpoint(d: Path, data_name: str, **llama_kw):
    """A tiny Llama checkpoint with a word-level tokenizer in `d`, plus a JSONL text file `data_name`
    of 8 overlapping 20-word lines; returns (d, data path). For CLI tests that load from disk."""
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1}
    for w in CHECKPOINT_WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      eos_token_id=1, bos_token_id=1, **llama_kw)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    data = d / data_name
    data.write_text("\n".join(json.dumps({"text": " ".join(CHECKPOINT_WORDS[i:i + 20])})
                              for i in range(0, 40, 5)))
    return d, data


@pytest.fixture(scope="session")
def word_checkpoint():
    """write_word_checkpoint(d, data_name, **LlamaConfig overrides) -> (d, data path)."""
    return write_word_checkpoint


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, loaded once per session: share it."""
    from sagequant.calibration.real_data import load_smollm2
    return load_smollm2()


def _rotary_interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout (two halves per head) -> GGUF's (pairs adjacent), which llama.cpp's
    converter writes and transformers' GGUF loader undoes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_MERGES = ("Ġ t", "h e", "Ġt he", "Ġ a", "a t")


def gguf_byte_vocab() -> list[str]:
    """A byte-level BPE vocabulary (GPT-2's 256 byte symbols, a few merges, an end-of-text token)
    for tiny GGUF files: small enough that writing and loading take a fraction of a second."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    merged = ["".join(m.split(" ")) for m in GGUF_MERGES]
    return list(bytes_to_unicode().values()) + merged + ["<|endoftext|>"]


def write_tiny_gguf(model, path: Path) -> Path:
    """`model` (a tiny LlamaForCausalLM with tied embeddings and vocab_size == len(gguf_byte_vocab()))
    as a float32 GGUF file with its byte-level tokenizer, the layout llama.cpp's converter writes."""
    import gguf
    cfg = model.config
    tokens = gguf_byte_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(list(GGUF_MERGES))
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one is a control token
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_bos_token_id(len(tokens) - 1)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        parts = name.split(".")  # model.layers.3.self_attn.q_proj.weight / model.norm.weight
        t = tensor.detach().float()
        if parts[-2] == "q_proj":
            t = _rotary_interleave(t, cfg.num_attention_heads)
        elif parts[-2] == "k_proj":
            t = _rotary_interleave(t, cfg.num_key_value_heads)
        prefix = f"blk.{parts[2]}." if parts[1] == "layers" else ""
        writer.add_tensor(f"{prefix}{names[parts[-2]]}.weight", t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny random Llama GGUF file with a byte-level tokenizer, the float model in it)."""
    model = build_tiny("llama", vocab_size=len(gguf_byte_vocab()), tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    return write_tiny_gguf(model, path), model
