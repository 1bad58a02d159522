"""An ONNX LLM graph as the quantizer sees it: loaded and checked, its linears (MatMul / Gemm with
a constant weight) named after the module that emitted them, and its norm -> linears groups.

Layer names come from the node metadata torch.onnx (dynamo) writes, `pkg.torch.onnx.name_scopes`
(the module path, e.g. "m.model.layers.0.mlp.down_proj"), so QuantConfig.ignore / overrides
patterns such as "lm_head" or "down_proj" select the same layers as on the torch side; graphs
without it fall back to the weight initializer's name. Ops are checked against the standard ops
a decoder LLM export uses; anything else (custom domains, control flow whose subgraphs we would
not see into) is refused naming the op and the node.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import UnsupportedError


class OnnxInputError(UnsupportedError):
    """The ONNX model cannot be quantized: unreadable, invalid, or with ops we do not know."""


# Standard ai.onnx ops of decoder-only LLM exports (torch.onnx dynamo / optimum), plus the
# element-wise and shape ops around them. Extending this list is safe for any op without
# subgraphs: the passes only rewrite MatMul / Gemm weights and norm scales.
KNOWN_OPS = frozenset("""
Abs Add And ArgMax Cast CastLike Ceil Clip Concat Constant ConstantOfShape Cos CumSum Div Einsum
Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual
Identity IsInf IsNaN LayerNormalization Less LessOrEqual Log MatMul Max Mean Min Mod Mul Neg Not Or
Pow Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape RMSNormalization
ScatterElements ScatterND Shape Sigmoid Sin Size Slice Softmax Split Sqrt Squeeze Sub Tanh Tile
Transpose Trilu Unsqueeze Where Xor
""".split())
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class Linear:
    """One quantizable linear: y = x @ W (W stored [in, out] as ONNX MatMul reads it)."""

    name: str
    node: object                # graphsurgeon MatMul / Gemm node
    weight: object              # graphsurgeon Constant [in, out]
    x: object                   # graphsurgeon Variable, the activation input
    bias: object = None         # Gemm's C input (Constant) or None
    transposed: bool = False    # the node stores W as [out, in] (Gemm transB=1)
    # Set by annotation (None: kept in float) and by the balancing passes.
    scheme: str | None = None
    weight_spec: object = None  # QuantSpec
    act_spec: object = None     # QuantSpec of the input, or None (16-bit activations)
    clip_ratio: float = 1.0

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    def weight_out_in(self) -> np.ndarray:
        """The weight as [out, in] float32, the QuantSpec convention (rows = output channels)."""
        return np.ascontiguousarray(np.asarray(self.weight.values, dtype=np.float32).T)

    def set_weight_out_in(self, w: np.ndarray) -> None:
        """Replace this linear's weight by a new constant on its node (the old one may be shared)."""
        import onnx_graphsurgeon as gs
        dtype = np.asarray(self.weight.values).dtype
        name = f"{self.name}.weight_balanced"
        self.weight = gs.Constant(name, np.ascontiguousarray(w.T.astype(dtype)))
        stored = w if self.transposed else w.T  # Gemm(transB=1) stores [out, in]
        self.node.inputs[1] = gs.Constant(name + "_stored", np.ascontiguousarray(stored.astype(dtype)))


@dataclass
class NormGroup:
    """x = normed * gamma (an RMSNorm / LayerNorm scale, a 1-D constant) read only by linears."""

    gamma: object               # graphsurgeon Constant [in]
    scale_node: object          # the Mul applying gamma
    linears: list[Linear] = field(default_factory=list)


def load(model_or_path):
    """An onnx.ModelProto from a path or a ModelProto, checked; OnnxInputError otherwise."""
    import onnx
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as e:  # protobuf DecodeError, truncated external data, ...
            raise OnnxInputError(f"{str(path)!r} is not a readable ONNX model: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
    elif isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    else:
        raise OnnxInputError(f"expected an ONNX file path or onnx.ModelProto, got {type(model_or_path).__name__}")
    if not model.graph.node:
        raise OnnxInputError("the ONNX model has an empty graph (no nodes)")
    check_ops(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise OnnxInputError(f"the ONNX model is invalid: {str(e).splitlines()[0]}") from None
    return model


def check_ops(model) -> None:
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in KNOWN_OPS:
            op = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            raise OnnxInputError(
                f"the quantizer does not know op {op} (node {node.name or '<unnamed>'}); it handles "
                "standard ONNX ops of decoder LLM exports without subgraphs "
                "(sagequant.frontends.onnx.graph.KNOWN_OPS)")


def scope_names(model) -> dict[str, str]:
    """{node name: module path} from torch.onnx's name scopes, read off the ModelProto
    (onnx-graphsurgeon does not keep node metadata)."""
    names = {}
    for node in model.graph.node:
        text = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None)
        try:
            scopes = ast.literal_eval(text) if text else []
        except (ValueError, SyntaxError):
            scopes = []
        if len(scopes) >= 2 and isinstance(scopes[-2], str) and scopes[-2]:
            names[node.name] = scopes[-2]  # the last entry is the op itself
    return names


def _transposed_constant(t) -> bool:
    """t = Transpose(C) of a 2-D constant (perm [1, 0] or default)."""
    import onnx_graphsurgeon as gs
    if len(getattr(t, "inputs", ())) != 1 or t.inputs[0].op != "Transpose":
        return False
    src, perm = t.inputs[0].inputs[0], t.inputs[0].attrs.get("perm", [1, 0])
    return isinstance(src, gs.Constant) and len(src.shape) == 2 and list(perm) == [1, 0]


def _layer_name(node, weight_name: str, scopes: dict[str, str]) -> str:
    if node.name in scopes:
        return scopes[node.name]
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def find_linears(graph, scopes: dict[str, str]) -> list[Linear]:
    """MatMul(x, W) / Gemm(x, W[, C]) with W a 2-D float constant, in graph order."""
    import onnx_graphsurgeon as gs
    out = []
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        weight_name = w.name
        if node.op == "MatMul" and _transposed_constant(w):  # tied embeddings: x @ Transpose(E)
            source = w.inputs[0].inputs[0]
            weight_name = source.name
            w = gs.Constant(f"{source.name}_kn", np.ascontiguousarray(np.asarray(source.values).T))
        if not isinstance(w, gs.Constant) or len(w.shape) != 2 or np.dtype(w.dtype).kind != "f":
            continue
        if isinstance(x, gs.Constant):
            continue
        bias, transposed = None, False
        if node.op == "Gemm":
            attrs = node.attrs
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue  # only the plain x @ W (+ C) form is a linear we can rewrite exactly
            if attrs.get("transB", 0):  # W stored [out, in]: read it as [in, out]
                w, transposed = gs.Constant(f"{w.name}_kn", np.ascontiguousarray(np.asarray(w.values).T)), True
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and not isinstance(bias, gs.Constant):
                continue
        name = _layer_name(node, weight_name, scopes)
        if any(lin.name == name for lin in out):  # names become node / initializer names
            name = f"{name}@{node.name}"
        out.append(Linear(name, node, w, x, bias, transposed))
    return out


def norm_groups(graph, linears: list[Linear], quantized: set[str]) -> list[NormGroup]:
    """Linears whose shared input is Mul(normed, gamma) with gamma a 1-D constant of in_features,
    read by quantized linears only: the scale SmoothQuant / AWQ fold into gamma."""
    import onnx_graphsurgeon as gs
    by_input: dict[int, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(id(lin.x), []).append(lin)
    groups = []
    for members in by_input.values():
        x = members[0].x
        if len(x.inputs) != 1 or x.inputs[0].op != "Mul":
            continue
        mul = x.inputs[0]
        gammas = [t for t in mul.inputs if isinstance(t, gs.Constant) and len(t.shape) == 1
                  and t.shape[0] == members[0].in_features]
        consumers = {id(n) for n in x.outputs}
        if (len(gammas) != 1 or consumers != {id(m.node) for m in members}
                or not all(m.name in quantized for m in members) or len(gammas[0].outputs) != 1):
            continue
        groups.append(NormGroup(gammas[0], mul, members))
    return groups
