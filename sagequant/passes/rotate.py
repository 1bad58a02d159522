"""rotate: orthogonal rotations that keep the float model's function and spread activation outliers
over all channels before anything is quantized (QuaRot / SpinQuant style, fixed rotations).

Found on the canonical graph by following the residual stream from the token embedding
(ir/rotation_patterns.py); with R1 the residual rotation (calibration/rotation.py):
  embedding E          -> E R1 (a tied head is untied first: the head gets its own tensor, and
                          model_info's tie_word_embeddings becomes False)
  rms_norm -> linears  the norm weight is folded into the linears' columns and set to ones (a
                          scale-free norm commutes with R1, since rms(x R1) = rms(x)); W -> W R1
  writers (o_proj,     W -> R1ᵀ W, bias b -> b R1
   down_proj)
  online (down_proj)   a sagequant::online_rotate node x -> x R applied to down_proj's input
                          (R = A ⊗ H_p, calibration/rotation.py), W -> W R: int8 / fp8 activation
                          quantizers then see the rotated, outlier-free tensor
  heads (v/o)          per-head Hadamard of head_dim on v_proj's output rows and o_proj's input
                          columns (attention is linear in V), fused into both weights
All weight math is float64, cast back to each tensor's dtype. It runs right after annotate, so
the mixed-precision search, smoothing, AWQ, GPTQ and the observers all see the rotated model; each
rotated linear's annotation records its change of basis (input_rotation / output_rotation), so
the per-layer error report and the accuracy guard compare it with the float layer correctly.
"""
from __future__ import annotations

import torch

from ..calibration.rotation import (describe_online, head_rotation, online_block, residual_rotation)
from ..ir import ops  # noqa: F401  (registers sagequant::online_rotate)
from ..ir.annotations import Rotation
from ..ir.graph import QuantGraph
from ..ir.trace import WRAPPER_PREFIX, layer_name
from ..ir.rotation_patterns import RotationMatchError, match_rotation
from .manager import PassContext, PassResult, define_pass

ONLINE_ROTATE = torch.ops.sagequant.online_rotate.default
BLOCK_PREFIX = "rotation.online_"


@define_pass("rotate", "fold orthogonal (Hadamard) rotations into the weights; online rotation "
                       "before down_proj", requires=("annotate",))
def rotate(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    found = match_rotation(graph, heads=cfg.rotate_heads)
    hidden = found.hidden
    r1 = residual_rotation(hidden, cfg.rotate, cfg.rotate_seed)
    untied = _untie_embedding(graph, found.embedding)
    emb_w = found.embedding.args[0].target
    graph.set_attr(emb_w, _mm(graph.attr(emb_w), right=r1))
    back = r1.t()
    for norm, readers in found.norms:
        gamma = _scale_free(graph, norm)
        folded = gamma[:, None] * r1  # the norm's scale into the readers' columns, then R1
        for lin in readers:
            _rotate_linear(graph, lin, right=folded)
            _record(graph, lin, "input_rotation", Rotation(back, gamma))
    online = {}  # width -> (block attribute, the dense rotation), built once
    for lin in found.mlp_writers if cfg.rotate_online else ():
        weight = graph.attr(lin.args[1])
        width = weight.shape[1]
        if width not in online:
            block = online_block(width, cfg.rotate_seed)
            name = BLOCK_PREFIX + str(width)
            # fp32 at least (a bf16 block would not be orthogonal); online_rotate computes in it.
            graph.set_attr(name, block.to(torch.promote_types(weight.dtype, torch.float32)))
            online[width] = (name, ops.apply_online(torch.eye(width, dtype=torch.float64), block))
        name, dense = online[width]
        _insert_online(graph, lin, name)
        _rotate_linear(graph, lin, right=dense)
        _record(graph, lin, "input_rotation", Rotation(dense.t()))
    heads = {}  # (head_dim, heads) -> block-diagonal rotation, built once
    for head in found.heads:
        for key in ((head.head_dim, head.kv_heads), (head.head_dim, head.heads)):
            if key not in heads:
                heads[key] = head_rotation(*key)
        rot_v, rot_o = heads[head.head_dim, head.kv_heads], heads[head.head_dim, head.heads]
        _rotate_linear(graph, head.v_proj, left=rot_v.t(), bias_right=rot_v)
        _record(graph, head.v_proj, "output_rotation", Rotation(rot_v))
        _rotate_linear(graph, head.o_proj, right=rot_o)
        _record(graph, head.o_proj, "input_rotation", Rotation(rot_o.t()))
    for lin in found.writers:
        _rotate_linear(graph, lin, left=r1.t(), bias_right=r1)
        _record(graph, lin, "output_rotation", Rotation(r1))
    graph.recompile()
    stats = {"rotation": cfg.rotate, "hidden": hidden, "residual_block": describe_online(hidden),
             "norms_folded": len(found.norms), "readers_rotated": sum(len(r) for _, r in found.norms),
             "writers_rotated": len(found.writers), "untied_embedding": untied,
             "online_rotations": len(found.mlp_writers) if cfg.rotate_online else 0,
             "online_blocks": {w: describe_online(w) for w in online},
             "head_rotations": len(found.heads)}
    return PassResult(graph, True, stats)


def _mm(w: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None):
    out = w.detach().double()
    if left is not None:
        out = left @ out
    if right is not None:
        out = out @ right
    return out.to(w.dtype).contiguous()


def _rotate_linear(graph: QuantGraph, lin, left=None, right=None, bias_right=None) -> None:
    """W -> left · W · right for a linear y = x Wᵀ + b; the bias follows its output: b -> b · bias_right."""
    target = lin.args[1].target
    _check_private(graph, lin.args[1], lin)
    graph.set_attr(target, _mm(graph.attr(target), left, right))
    bias = lin.args[2] if len(lin.args) > 2 else None
    if bias is not None and bias_right is not None:
        _check_private(graph, bias, lin)
        graph.set_attr(bias.target, _mm(graph.attr(bias.target)[None, :], right=bias_right)[0])


def _check_private(graph: QuantGraph, attr, lin) -> None:
    readers = [u for n in graph.graph.nodes if n.op == "get_attr" and n.target == attr.target
               for u in n.users]
    if readers != [lin]:
        raise RotationMatchError(f"rotate: {attr.target} is read by {len(readers)} ops "
                                 f"({', '.join(u.name for u in readers)}), not by {lin.name} alone; "
                                 "a shared weight cannot take two rotations")


def _scale_free(graph: QuantGraph, norm) -> torch.Tensor:
    """Make the norm scale-free (weight ones, offset 0) and return its per-channel scale (weight +
    offset, float64), which its readers' columns take over; rms(x R1) = rms(x), so a scale-free
    norm commutes with R1."""
    w_node = norm.args[1]
    _check_private(graph, w_node, norm)
    weight = graph.attr(w_node)
    scale = weight.detach().double() + float(norm.args[3])
    graph.set_attr(w_node.target, torch.ones_like(weight))
    norm.args = (norm.args[0], w_node, norm.args[2], 0.0)
    return scale


def _record(graph: QuantGraph, lin, name: str, rotation: Rotation) -> None:
    """Note the change of basis on the annotation, for the per-layer error report."""
    ann = graph.annotation(lin)
    if ann is None:
        return
    if getattr(ann, name) is not None:
        raise RotationMatchError(f"rotate: {ann.layer} already has an {name}; a linear takes one per side")
    graph.update_annotation(lin, **{name: rotation})


def _untie_embedding(graph: QuantGraph, embedding) -> bool:
    """Give the embedding its own weight tensor when the head (or anything else) reads the same
    one: the two are rotated differently (the head also absorbs the final norm's weight)."""
    w_node = embedding.args[0]
    if all(u is embedding for u in w_node.users):
        return False
    module = layer_name(embedding)
    name = WRAPPER_PREFIX + module + ".weight" if module else w_node.target + "_embedding"
    if any(n.op == "get_attr" and n.target == name for n in graph.graph.nodes):
        raise RotationMatchError(f"rotate: cannot untie the embedding {embedding.name}: attribute "
                                 f"{name!r} is already read by the graph")
    graph.set_attr(name, graph.attr(w_node).detach().clone())
    with graph.graph.inserting_before(embedding):
        own = graph.graph.get_attr(name)
    embedding.replace_input_with(w_node, own)
    hf = graph.model_info.get("hf_config")
    if isinstance(hf, dict):
        graph.model_info["hf_config"] = {**hf, "tie_word_embeddings": False}
    return True


def _insert_online(graph: QuantGraph, lin, block_name: str) -> None:
    x = lin.args[0]
    with graph.graph.inserting_before(lin):
        block = graph.graph.get_attr(block_name)
        rotated = graph.graph.call_function(ONLINE_ROTATE, (x, block))
    rotated.meta.update({k: v for k, v in x.meta.items() if k in ("nn_module_stack", "val")})
    lin.replace_input_with(x, rotated)
