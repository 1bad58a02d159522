"""Quantization-aware training of a FakeQuant graph: the training half of `sagequant qat` and
`compile(..., QuantConfig(enable_qat=True), qat=QATOptions(...))` (api.quantization_aware_training
runs the passes around it).

Flow (the qat pipeline of passes/pipeline.py): trace -> the PTQ passes before convert, then
`fake_quant` -> `qat_train` trains the FakeQuant graph here (LoRA adapters from peft and/or LSQ
scales; everything else frozen) and merges the adapters into the weights -> `fold_fake_quant` and
the PTQ passes from convert on: the same static graph, KernelBindings and artifact as PTQ. The training is on the traced graph itself, so the QuantSpecs
that training sees are the ones convert uses, node for node.

Loss: "distill" (default) is the KL divergence from the float model's next-token distribution
(the model passed in is the teacher); "ce" is next-token cross-entropy on the training text.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, QuantConfig
from ..progress import track
from .datasets import CalibrationDataError, as_token_batches, load_texts, tokenize_calibration
from .fake_quant import FakeQuantize, FakeQuantLinear, lora_layer_class

LOSSES = ("distill", "ce")
ADAPTER_NAME = "qat"


def _bad(name: str, value, valid: str) -> ConfigError:
    return ConfigError(f"QATOptions.{name}={value!r} is not valid; valid: {valid}")


@dataclass
class QATOptions:
    """Training settings (the quantization itself is the QuantConfig's). Exactly one of `steps`
    (optimizer steps) and `epochs` (passes over the training windows) is set."""

    steps: int | None = 100
    epochs: int | None = None
    lr: float = 1e-4              # LoRA adapters (or the weights themselves when lora_rank=0)
    scale_lr: float = 1e-5        # LSQ scales (QuantConfig.qat_learn_scales)
    batch_size: int = 1
    seq_len: int = 512
    lora_rank: int = 16           # 0: no adapters, the quantized layers' weights train directly
    lora_alpha: float = 16.0
    loss: str = "distill"
    warmup_steps: int = 0         # linear warm-up, then cosine decay to 0
    freeze_observers_step: int | None = None  # observers stop updating scales from this step on
    grad_clip: float = 1.0
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"QATOptions: set exactly one of steps and epochs (got steps={self.steps!r}, "
                              f"epochs={self.epochs!r})")
        for name in ("steps", "epochs", "batch_size", "seq_len", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise _bad(name, value, "an int >= 1" + (" or None" if name != "batch_size" else ""))
        if self.seq_len < 2:
            raise _bad("seq_len", self.seq_len, "an int >= 2 (a context token and a target)")
        for name in ("lr", "scale_lr", "lora_alpha", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise _bad(name, value, "a finite number > 0")
        if self.lr > 1e-2:
            raise _bad("lr", self.lr, "a low learning rate in (0, 1e-2]: QAT fine-tunes a trained model")
        for name in ("lora_rank", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(name, value, "an int >= 0")
        if self.freeze_observers_step is not None and (not isinstance(self.freeze_observers_step, int)
                                                       or self.freeze_observers_step < 0):
            raise _bad("freeze_observers_step", self.freeze_observers_step, "None or an int >= 0")
        if self.loss not in LOSSES:
            raise _bad("loss", self.loss, ", ".join(LOSSES))
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ConfigError("QATOptions.checkpoint_every needs QATOptions.checkpoint_dir")


def training_windows(data, tokenizer, options: QATOptions) -> torch.Tensor:
    """[n, seq_len] token windows: texts (or a .jsonl / text file) cut into consecutive windows,
    as many as `steps * batch_size` needs (all of them for `epochs`); token tensors as given."""
    if data is None or (hasattr(data, "__len__") and len(data) == 0):
        raise CalibrationDataError("QAT training data is empty: pass texts, a .jsonl / text file "
                                   "or token ids")
    texts = load_texts(data) if isinstance(data, (str, Path)) else data
    if isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts):
        if tokenizer is None:
            raise CalibrationDataError("QAT training data is text: a tokenizer is required")
        wanted = options.steps * options.batch_size if options.steps else 1 << 40
        return tokenize_calibration(texts, tokenizer, wanted, options.seq_len)
    batches = as_token_batches(texts)
    if len({b.shape[1] for b in batches}) != 1:
        raise CalibrationDataError("QAT training token batches must share one sequence length, got "
                                   f"{sorted({b.shape[1] for b in batches})}")
    return torch.cat(batches)


def fake_quant_modules(gm: torch.nn.Module) -> list[FakeQuantize]:
    return [m for m in gm.modules() if isinstance(m, FakeQuantize)]


def add_lora(gm: torch.nn.Module, rank: int, alpha: float) -> list[str]:
    """peft LoRA adapters on every FakeQuantLinear (fake-quantizing W + delta); returns their paths."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [name for name, m in gm.named_modules() if isinstance(m, FakeQuantLinear)]
    if not targets:
        raise ValueError("no FakeQuantLinear in the graph: run the fake_quant pass "
                         "(QuantConfig.enable_qat=True) before adding LoRA adapters")
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    lora._register_custom_module({FakeQuantLinear: lora_layer_class()})
    inject_adapter_in_model(lora, gm, adapter_name=ADAPTER_NAME)
    return targets


def merge_lora(gm: torch.nn.Module) -> int:
    """Merge every adapter into its FakeQuantLinear's weight (peft's merge) and unwrap it."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in gm.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge(safe_merge=True)
        gm.set_submodule(name, layer.get_base_layer())
    return len(wrapped)


def qat_loss(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None):
    """Mean per-token KL(teacher || student), or next-token cross-entropy without a teacher."""
    if teacher_logits is None:
        return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    log_s = F.log_softmax(student_logits.float(), -1).flatten(0, 1)
    log_t = F.log_softmax(teacher_logits.float(), -1).flatten(0, 1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def _trainable(gm: torch.nn.Module, lora: bool) -> tuple[list, list]:
    """(adapter or weight params, scale params); requires_grad is switched off for the rest."""
    for p in gm.parameters():
        p.requires_grad_(False)
    weights = []
    for name, m in gm.named_modules():
        if lora and "lora_" in name and isinstance(m, torch.nn.Linear):
            weights += list(m.parameters())
        elif not lora and isinstance(m, FakeQuantLinear):
            weights.append(m.weight)
    scales = [m.scale for m in fake_quant_modules(gm) if m.learns_scale]
    for p in weights + scales:
        p.requires_grad_(True)
    return weights, scales


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_fake_quant_graph(gm: torch.nn.Module, teacher: torch.nn.Module | None,
                           windows: torch.Tensor, opts: QATOptions) -> dict:
    """Train `gm` (a graph after fake_quant) in place; adapters are merged back at the end and
    observers frozen, so `gm` is ready for fold_fake_quant. Returns the training statistics."""
    if not fake_quant_modules(gm):
        raise ValueError("no FakeQuant in the graph: run the fake_quant pass (QuantConfig.enable_qat=True)")
    total = opts.steps or math.ceil(opts.epochs * len(windows) / opts.batch_size)
    if opts.lora_rank:
        add_lora(gm, opts.lora_rank, opts.lora_alpha)
    weights, scales = _trainable(gm, bool(opts.lora_rank))
    names = {id(p): name for name, p in gm.named_parameters()}
    trained = [(names[id(p)], p) for p in weights + scales]
    groups = [{"params": weights, "lr": opts.lr}] + ([{"params": scales, "lr": opts.scale_lr}] if scales else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, opts.warmup_steps))
    gen = torch.Generator().manual_seed(opts.seed)
    order = torch.cat([torch.randperm(len(windows), generator=gen)
                       for _ in range(math.ceil(total * opts.batch_size / len(windows)))])
    losses, start = [], time.perf_counter()
    # Only the FakeQuant modules change behaviour in training mode (observers update); an
    # exported graph module refuses .train() itself.
    for fq in fake_quant_modules(gm):
        fq.train()
    for step in track(range(total), "qat", unit="step") if opts.progress else range(total):
        if step == opts.freeze_observers_step:
            for fq in fake_quant_modules(gm):
                fq.freeze()
        ids = windows[order[step * opts.batch_size:(step + 1) * opts.batch_size]]
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        loss = qat_loss(gm(ids), ids, teacher_logits)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"QAT loss became {float(loss)} at step {step}; lower "
                                     f"QATOptions.lr={opts.lr} / scale_lr={opts.scale_lr}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights + scales, opts.grad_clip)
        optimizer.step()
        sched.step()
        losses.append(float(loss.detach()))
        if opts.checkpoint_every and (step + 1) % opts.checkpoint_every == 0:
            save_checkpoint(gm, trained, Path(opts.checkpoint_dir) / f"step_{step + 1:06d}.safetensors",
                            step + 1, losses[-1])
    seconds = time.perf_counter() - start
    if opts.checkpoint_dir:
        save_checkpoint(gm, trained, Path(opts.checkpoint_dir) / "final.safetensors", total, losses[-1])
    for p in weights + scales:
        p.requires_grad_(False)
    merged = merge_lora(gm) if opts.lora_rank else 0
    for fq in fake_quant_modules(gm):
        fq.freeze()
        fq.eval()
    k = max(1, min(10, total // 5))
    return {"steps": total, "tokens": total * opts.batch_size * windows.shape[1], "seconds": seconds,
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "losses": losses,
            "windows": len(windows), "trainable_params": sum(p.numel() for p in weights + scales),
            "merged_adapters": merged, "options": asdict(opts)}


def save_checkpoint(gm: torch.nn.Module, trained: list, path: Path, step: int, loss: float) -> Path:
    """What QAT changes — the trained (name, parameter) pairs (adapters or weights, LSQ scales) and
    every observed FakeQuant scale — as safetensors, written atomically (temporary file, rename)."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().contiguous().clone() for name, p in trained}
    tensors.update({name: b.detach().contiguous().clone() for name, b in gm.named_buffers()
                    if name.endswith((".scale", ".zero_point"))})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "loss": repr(loss)})
    os.replace(tmp, path)
    return path
