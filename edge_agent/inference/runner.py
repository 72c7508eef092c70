"""ONNX Runtime sessions: execution provider choice, warm-up, batching, IO binding on GPU.

Provider order comes from config (default TensorRT -> CUDA -> CPU) filtered by what this
onnxruntime build reports; the provider the session actually runs on (ONNX Runtime may fall
back) is read back from the session and recorded with every result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.errors import PermanentError
from edge_agent.inference.selftest import run_self_test
from hub_protocol.package import ModelPackage

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class ModelLoadError(PermanentError):
    """ONNX Runtime could not load the model (corrupt file, unsupported operator...)."""


class NoProvider(PermanentError):
    """None of the configured execution providers is available in this onnxruntime build."""


def choose_providers(wanted: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """The ONNX Runtime provider names to request, in order: ``wanted`` (short names
    ``tensorrt``/``cuda``/``cpu``) filtered by ``available`` (default: this build's).

    Raises :class:`NoProvider` if nothing is left, ValueError for an unknown short name.
    """
    avail = set(ort.get_available_providers() if available is None else available)
    out = []
    for short in wanted:
        if short not in PROVIDERS:
            raise ValueError(f"unknown execution provider {short!r}")
        if PROVIDERS[short] in avail:
            out.append(PROVIDERS[short])
    if not out:
        raise NoProvider(
            f"none of the configured providers {list(wanted)} is available "
            f"(this onnxruntime has {sorted(avail)})"
        )
    return out


@dataclass(frozen=True)
class RunStats:
    batches: int
    items: int
    seconds: float


class ModelRunner:
    """One loaded, warmed-up, self-tested session for one model package."""

    def __init__(
        self,
        package: ModelPackage,
        *,
        providers: Sequence[str] = ("tensorrt", "cuda", "cpu"),
        device_id: int = 0,
        max_batch_size: int = 64,
        intra_op_threads: int = 0,
    ) -> None:
        self.package = package
        self.manifest = package.manifest
        self.batch_size = max(1, min(self.manifest.batch_size, max_batch_size))
        requested = choose_providers(providers)
        options: list[Any] = []
        for name in requested:
            if name in (PROVIDERS["cuda"], PROVIDERS["tensorrt"]):
                options.append((name, {"device_id": device_id}))
            else:
                options.append(name)
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(package.model_path), so, providers=options)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(
                f"{self.manifest.name} {self.manifest.version}: ONNX Runtime cannot load "
                f"{self.manifest.model_file}: {str(exc).splitlines()[0][:300]}"
            ) from exc
        self.provider = self.session.get_providers()[0]
        self.device_id = device_id
        self._use_io_binding = self.provider != PROVIDERS["cpu"]
        # Warm-up and self-test in one: the first run pays for allocation/graph capture.
        started = time.perf_counter()
        run_self_test(self, self.manifest)
        log.info(
            "model loaded",
            extra={
                "model": self.manifest.name,
                "version": self.manifest.version,
                "provider": self.provider,
                "warmup_s": round(time.perf_counter() - started, 3),
            },
        )

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, Any]) -> list[Any]:
        """One raw session call (IO binding on GPU providers)."""
        if not self._use_io_binding:
            return list(self.session.run(output_names, feed))
        io = self.session.io_binding()
        for name, value in feed.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in output_names or [o.name for o in self.session.get_outputs()]:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        return list(io.copy_outputs_to_cpu())

    def infer(self, items: Sequence[np.ndarray]) -> tuple[np.ndarray, RunStats]:
        """Run ``items`` (each [C, H, W] float32) in batches of ``batch_size``; returns the
        model output for all items, stacked along the first axis, and timing."""
        if not items:
            raise ValueError("nothing to infer")
        dtype = np.float16 if self.manifest.input.dtype == "float16" else np.float32
        outs = []
        started = time.perf_counter()
        batches = 0
        for i in range(0, len(items), self.batch_size):
            batch = np.stack(items[i : i + self.batch_size]).astype(dtype, copy=False)
            outs.append(
                np.asarray(
                    self.run([self.manifest.output.name], {self.manifest.input.name: batch})[0]
                )
            )
            batches += 1
        seconds = time.perf_counter() - started
        return np.concatenate(outs, axis=0), RunStats(batches, len(items), seconds)
