"""Dynamic int8 quantization of an export folder's graphs (``ifnet export --int8``).

ONNX Runtime's ``quantize_dynamic`` stores weights as int8 and quantizes activations on the fly, with no
calibration data. What it is applied to, and why:

* **Transformer, memory and output projections** (``MatMul`` with a constant weight): these dominate the
  encoder and the per-token decoder step, and ONNX Runtime runs them as fused int8 ``DynamicQuantizeMatMul``
  (``MatMulIntegerToFloat``).
  The TorchScript exporter writes a ``Linear`` on a 2-D input (every decoder-step projection) as ``Gemm``,
  which ``quantize_dynamic`` does not handle, so :func:`gemm_to_matmul` first rewrites those as
  ``MatMul`` + ``Add``.
* **Not the CNN backbone.** Dynamic quantization turns ``Conv`` into ``ConvInteger``, which on CPU was
  not faster than the fp32 convolution in our measurements (docs/DEPLOY.md); an int8 backbone needs static
  (calibrated, QDQ) quantization, which this module does not do. The int8 variant therefore runs the fp32
  ``backbone.onnx`` (the manifest maps each variant to its files).
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["INT8_OP_TYPES", "gemm_to_matmul", "quantize_graph", "quantize_export"]

#: Operator types quantized per graph. An empty list: the int8 variant uses the fp32 graph.
INT8_OP_TYPES = {"backbone": [], "encoder": ["MatMul"], "decoder_step": ["MatMul"]}


def gemm_to_matmul(model) -> int:
    """Rewrite ``Gemm(A, W, b)`` with a constant ``W`` (``alpha = beta = 1``) as ``MatMul(A, W') + b``
    in place; returns the number of nodes rewritten. ``W'`` is a new initializer, transposed if needed."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes = []
    count = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        w_name = f"{node.name or node.output[0]}_matmul_weight"
        graph.initializer.append(numpy_helper.from_array(weight.copy(), w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out],
                                          name=f"{node.name}_MatMul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                              name=f"{node.name}_Add"))
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    # Weights that only the old Gemm nodes read are dropped.
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    return count


def quantize_graph(src: Path, dst: Path, op_types: list[str]) -> None:
    """Write the int8 version of the graph ``src`` to ``dst``, quantizing the operators ``op_types``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    gemm_to_matmul(model)
    # quantize_dynamic logs a generic "consider pre-processing" warning on the root logger for every graph;
    # the graphs are already shape-inferred and constant-folded by the exporter.
    logging.disable(logging.WARNING)
    try:
        # Signed int8 weights: ONNX Runtime's fused DynamicQuantizeMatMul path on x86.
        quantize_dynamic(model, str(dst), op_types_to_quantize=op_types, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        logging.disable(logging.NOTSET)


def quantize_export(folder: Path, files: dict[str, str]) -> dict[str, str]:
    """Quantize the fp32 graphs ``files`` (graph -> file name in ``folder``); returns the int8 variant's
    graph -> file name (``<graph>.int8.onnx``, or the fp32 file for a graph left in fp32)."""
    out = {}
    for graph, name in files.items():
        if not INT8_OP_TYPES[graph]:
            out[graph] = name
            continue
        out[graph] = name.replace(".onnx", ".int8.onnx")
        quantize_graph(folder / name, folder / out[graph], INT8_OP_TYPES[graph])
    return out
