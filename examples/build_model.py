"""Build the example ONNX model: a small classifier with fixed, seeded weights (no download).

    python examples/build_model.py OUT.onnx [--features 16] [--classes 3] [--hidden 0]

`--hidden N` adds an N x N hidden layer, to make a model of a chosen size (N=1600: about 10 MiB).
The model takes `features` (float32, [1, F]) and returns `probabilities` (float32, [1, C]).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(features: int = 16, classes: int = 3, hidden: int = 0, seed: int = 7) -> bytes:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, width = "features", features
    if hidden:
        w1 = rng.standard_normal((features, hidden), dtype=np.float32) / np.float32(
            np.sqrt(features)
        )
        w2 = rng.standard_normal((hidden, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))
        inits += [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
        nodes += [
            helper.make_node("MatMul", ["features", "w1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["a1"]),
            helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["a2"]),
        ]
        current, width = "a2", hidden
    w = rng.standard_normal((width, classes), dtype=np.float32) / np.float32(np.sqrt(width))
    b = rng.standard_normal((classes,), dtype=np.float32) * np.float32(0.1)
    inits += [numpy_helper.from_array(w, "w_out"), numpy_helper.from_array(b, "b_out")]
    nodes += [
        helper.make_node("MatMul", [current, "w_out"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "b_out"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "strongroom-demo-classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=0)
    args = parser.parse_args()
    args.out.write_bytes(build(args.features, args.classes, args.hidden))


if __name__ == "__main__":
    main()
