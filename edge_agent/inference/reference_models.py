"""Reference model packages built in code (no downloaded weights).

* ``ct-lesion-seg``: CT soft-tissue lesion segmentation expressed in ONNX operators:
  HU in [``LESION_HU_LOW``, ``LESION_HU_HIGH``] -> 3x3 box smoothing -> >= 0.5. Its mask can be
  recomputed exactly with numpy (:func:`reference_lesion_mask`), so results are checkable.
* ``resnet-mini``: a small ResNet-style 2D classifier (conv/BN/ReLU, residual blocks, global
  pooling, softmax) with seeded weights, to exercise batching and the classification path.
* ``resnet50-bench`` (on demand, never committed): a ResNet-50-sized network (bottleneck
  blocks 3-4-6-3, ~25 M parameters) for benchmarks.

``edge-agent models build-reference DIR`` writes them as packages (``model.onnx`` +
``manifest.json`` with SHA-256 and size of every file, and a self-test whose expected
statistics are computed here with ONNX Runtime on the CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hub_protocol.package import write_manifest_files

OPSET = 17
IR_VERSION = 9
LESION_HU_LOW = 20.0
LESION_HU_HIGH = 100.0
SEG_NAME = "ct-lesion-seg"
CLS_NAME = "resnet-mini"
BENCH_NAME = "resnet50-bench"


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
    name: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edge-agent reference models",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_lesion_segmenter() -> onnx.ModelProto:
    """[N,1,H,W] HU (float32) -> mask [N,1,H,W] (float32, 0/1)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, "H", "W"])
    inits = [
        numpy_helper.from_array(np.array(LESION_HU_LOW, np.float32), "lo"),
        numpy_helper.from_array(np.array(LESION_HU_HIGH, np.float32), "hi"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("GreaterOrEqual", ["image", "lo"], ["ge"]),
        helper.make_node("LessOrEqual", ["image", "hi"], ["le"]),
        helper.make_node("And", ["ge", "le"], ["inside"]),
        helper.make_node("Cast", ["inside"], ["raw"], to=TensorProto.FLOAT),
        helper.make_node(
            "AveragePool",
            ["raw"],
            ["smooth"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        helper.make_node("GreaterOrEqual", ["smooth", "half"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["mask"], to=TensorProto.FLOAT),
    ]
    return _model(nodes, [x], [y], inits, SEG_NAME)


def reference_lesion_mask(hu: np.ndarray) -> np.ndarray:
    """The segmenter's computation in numpy, for checking: ``hu`` is [..., H, W]."""
    raw = ((hu >= LESION_HU_LOW) & (hu <= LESION_HU_HIGH)).astype(np.float32)
    padded = np.pad(raw, [(0, 0)] * (raw.ndim - 2) + [(1, 1), (1, 1)])
    h, w = raw.shape[-2:]
    acc = np.zeros_like(raw)
    for dy in range(3):
        for dx in range(3):
            acc += padded[..., dy : dy + h, dx : dx + w]
    return (acc / 9.0 >= 0.5).astype(np.float32)


class _Net:
    """A tiny graph builder for conv nets with seeded weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        w = self.rng.normal(0, (2.0 / (cin * k * k)) ** 0.5, (cout, cin, k, k)).astype(np.float32)
        wn, bn = self._name("w"), self._name("bn")
        self.inits.append(numpy_helper.from_array(w, wn))
        scale = (1 + 0.1 * self.rng.standard_normal(cout)).astype(np.float32)
        bias = (0.1 * self.rng.standard_normal(cout)).astype(np.float32)
        for suffix, arr in (
            ("s", scale),
            ("b", bias),
            ("m", np.zeros(cout, np.float32)),
            ("v", np.ones(cout, np.float32)),
        ):
            self.inits.append(numpy_helper.from_array(arr, f"{bn}{suffix}"))
        c, b = self._name("conv"), self._name("bnout")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, wn],
                [c],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        self.nodes.append(
            helper.make_node("BatchNormalization", [c, f"{bn}s", f"{bn}b", f"{bn}m", f"{bn}v"], [b])
        )
        if not relu:
            return b
        r = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [b], [r]))
        return r

    def add_relu(self, a: str, b: str) -> str:
        s, r = self._name("add"), self._name("relu")
        self.nodes.append(helper.make_node("Add", [a, b], [s]))
        self.nodes.append(helper.make_node("Relu", [s], [r]))
        return r

    def basic_block(self, x: str, cin: int, cout: int, stride: int) -> str:
        y = self.conv_bn(x, cin, cout, 3, stride, relu=True)
        y = self.conv_bn(y, cout, cout, 3, 1, relu=False)
        short = (
            x
            if (stride == 1 and cin == cout)
            else self.conv_bn(x, cin, cout, 1, stride, relu=False)
        )
        return self.add_relu(y, short)

    def bottleneck(self, x: str, cin: int, mid: int, stride: int) -> str:
        cout = mid * 4
        y = self.conv_bn(x, cin, mid, 1, 1, relu=True)
        y = self.conv_bn(y, mid, mid, 3, stride, relu=True)
        y = self.conv_bn(y, mid, cout, 1, 1, relu=False)
        short = (
            x
            if (stride == 1 and cin == cout)
            else self.conv_bn(x, cin, cout, 1, stride, relu=False)
        )
        return self.add_relu(y, short)

    def head(self, x: str, cin: int, classes: int) -> str:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
        self.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
        w = self.rng.normal(0, (1.0 / cin) ** 0.5, (cin, classes)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, "fc_w"))
        self.inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
        self.nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]))
        self.nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        return "probabilities"


def build_resnet_mini(classes: int = 3, seed: int = 7) -> onnx.ModelProto:
    """[N,3,64,64] -> probabilities [N,classes]; ~60 k parameters."""
    net = _Net(seed)
    y = net.conv_bn("image", 3, 16, 3, 2, relu=True)
    y = net.basic_block(y, 16, 16, 1)
    y = net.basic_block(y, 16, 32, 2)
    y = net.basic_block(y, 32, 64, 2)
    out = net.head(y, 64, classes)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 64])
    p = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])
    return _model(net.nodes, [x], [p], net.inits, CLS_NAME)


def build_resnet50(classes: int = 3, seed: int = 50, size: int = 224) -> onnx.ModelProto:
    """ResNet-50 layout (bottlenecks 3-4-6-3, widths 64-2048): [N,3,size,size] -> [N,classes]."""
    net = _Net(seed)
    y = net.conv_bn("image", 3, 64, 7, 2, relu=True)
    net.nodes.append(
        helper.make_node(
            "MaxPool", [y], ["pool0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    y, cin = "pool0", 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            y = net.bottleneck(y, cin, mid, stride if i == 0 else 1)
            cin = mid * 4
    out = net.head(y, cin, classes)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])
    p = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])
    return _model(net.nodes, [x], [p], net.inits, BENCH_NAME)


def _self_test_stats(model_path: Path, manifest: dict[str, Any]) -> dict[str, float]:
    import onnxruntime as ort

    from edge_agent.inference.selftest import make_input

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = make_input(manifest["self_test"]["input"], manifest["input"]["shape"])
    out = sess.run([manifest["output"]["name"]], {manifest["input"]["name"]: x})[0]
    return {"mean": float(np.mean(out)), "std": float(np.std(out)), "atol": 1e-3}


def _write_package(out_dir: Path, model: onnx.ModelProto, manifest: dict[str, Any]) -> Path:
    root = out_dir / f"{manifest['name']}-{manifest['version']}"
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, root / "model.onnx")
    manifest["self_test"]["expect"] = _self_test_stats(root / "model.onnx", manifest)
    write_manifest_files(root, manifest)
    return root


def build_reference_packages(out_dir: Path, *, large: bool = False) -> list[Path]:
    """Write the reference packages under ``out_dir``; returns their folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_manifest: dict[str, Any] = {
        "schema_version": 1,
        "name": SEG_NAME,
        "version": "1.0.0",
        "task": "segmentation",
        "description": f"CT soft-tissue lesion: HU in [{LESION_HU_LOW:g}, {LESION_HU_HIGH:g}], "
        "3x3 smoothing, >= 0.5. Reference model; not for clinical use.",
        "model_file": "model.onnx",
        "batch_size": 8,
        "input": {"name": "image", "shape": [-1, 1, -1, -1], "dtype": "float32", "layout": "NCHW"},
        "preprocessing": {"modality_lut": True, "channels": 1},
        "output": {
            "name": "mask",
            "activation": "none",
            "labels": ["lesion"],
            "codes": {"lesion": {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}},
            "threshold": 0.5,
            "critical": {"lesion": 500.0},
        },
        "routing": {"modality": ["CT"], "min_rows": 64, "min_columns": 64},
        "self_test": {"input": {"generator": "ramp", "low": -200.0, "high": 200.0}},
    }
    cls_manifest: dict[str, Any] = {
        "schema_version": 1,
        "name": CLS_NAME,
        "version": "1.0.0",
        "task": "classification",
        "description": "ResNet-style 2D classifier with seeded weights (exercises batching). "
        "Reference model; its probabilities mean nothing clinically.",
        "model_file": "model.onnx",
        "batch_size": 16,
        "input": {"name": "image", "shape": [-1, 3, 64, 64], "dtype": "float32", "layout": "NCHW"},
        "preprocessing": {
            "modality_lut": True,
            "window": {"center": 40, "width": 400},
            "resize": [64, 64],
            "normalize": {"mean": 0.5, "std": 0.25},
            "channels": 3,
        },
        "output": {
            "name": "probabilities",
            "activation": "softmax",
            "labels": ["normal", "nodule", "effusion"],
            "codes": {
                "normal": {"scheme": "SCT", "value": "17621005", "meaning": "Normal"},
                "nodule": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"},
                "effusion": {"scheme": "SCT", "value": "60046008", "meaning": "Pleural effusion"},
            },
            "critical": {"effusion": 0.9},
        },
        "routing": {"modality": ["CT", "MR", "CR", "DX"]},
        "self_test": {"input": {"generator": "normal", "seed": 1, "batch": 2}},
    }
    roots = [
        _write_package(out_dir, build_lesion_segmenter(), seg_manifest),
        _write_package(out_dir, build_resnet_mini(), cls_manifest),
    ]
    if large:
        big = dict(
            cls_manifest,
            name=BENCH_NAME,
            batch_size=8,
            description="ResNet-50-sized benchmark network with seeded weights.",
        )
        big["input"] = dict(cls_manifest["input"], shape=[-1, 3, 224, 224])
        big["preprocessing"] = dict(cls_manifest["preprocessing"], resize=[224, 224])
        big["self_test"] = {"input": {"generator": "normal", "seed": 1, "batch": 1}}
        roots.append(_write_package(out_dir, build_resnet50(), big))
    return roots
