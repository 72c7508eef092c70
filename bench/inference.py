"""Inference throughput: the agent end to end against a raw ONNX Runtime loop, same run.

For each reference model, the same synthetic CT studies are run two ways:

* **agent**: from COMPLETE to result stored: routing, job claim, reading the DICOM files
  from the spool, decoding, preprocessing, batched ONNX Runtime, postprocessing, SEG/SR
  encoding (unless ``--no-dicom-outputs``) and the result commit;
* **raw**: ``InferenceSession.run`` over the already preprocessed inputs, same provider, same
  batch size: the floor the agent's overhead is measured against.

Prints slices/s, studies/s, the ratio agent/raw and per-study latency percentiles.

Usage::

    python bench/inference.py                     # 4 studies x 48 slices 512x512, CPU
    python bench/inference.py --large             # plus the ResNet-50-sized model
    python bench/inference.py --studies 2 --slices 16 --no-dicom-outputs
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.app import EdgeApp
from edge_agent.clock import FakeClock
from edge_agent.config import (
    AllowedCaller,
    Config,
    DicomConfig,
    InferenceConfig,
    ResultsConfig,
    StorageConfig,
    StudiesConfig,
)
from edge_agent.inference.preprocess import preprocess_instance
from edge_agent.inference.reference_models import build_reference_packages
from edge_agent.samples import make_study
from edge_agent.studies.ingest import Origin
from hub_protocol.package import open_package
from tests.conftest import split_part10


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def agent_run(
    work: Path, package: Path, studies: list[Any], providers: list[str], dicom_outputs: bool
) -> dict[str, Any]:
    cfg = Config(
        dicom=DicomConfig(
            bind_address="127.0.0.1", port=0, allowed_callers=(AllowedCaller(ae_title="BENCH"),)
        ),
        storage=StorageConfig(data_dir=str(work / "agent"), min_free_mb=0),
        studies=StudiesConfig(quiet_period_s=1.0),
        inference=InferenceConfig(providers=tuple(providers)),
        results=ResultsConfig(dicom_outputs=dicom_outputs),
    )
    clock = FakeClock()
    app = EdgeApp(cfg, clock=clock)
    try:
        installed = app.registry.install(package)
        for study in studies:
            for f in study.files:
                ts, data = split_part10(f.read_bytes())
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                r = app.ingestor.receive(
                    data,
                    transfer_syntax=ts,
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    origin=Origin(association_id=None, calling_ae="BENCH"),
                )
                assert r.status == 0, r
        clock.advance(5)
        assert app.assembly.tick() == len(studies)
        app.inference.schedule()
        # load + warm up (self-test) the session outside the timing, as for the raw loop
        device = app.inference.devices[0]
        app.inference._runner(installed, device)
        per_study: list[float] = []
        started = time.perf_counter()
        while True:
            t = time.perf_counter()
            if not app.inference.run_one(device):
                break
            per_study.append(time.perf_counter() - t)
        total = time.perf_counter() - started
        rows = app.store.query("SELECT provider, instances FROM results")
        assert len(rows) == len(studies), "a job failed; see the agent's store"
        return {
            "seconds": total,
            "per_study_s": per_study,
            "provider": rows[0]["provider"],
            "slices": sum(int(r["instances"]) for r in rows),
        }
    finally:
        app.listener.stop(grace_s=1.0)
        app.close()


def raw_run(
    package: Path, studies: list[Any], providers: list[str], batch_size: int
) -> dict[str, Any]:
    pkg = open_package(package)
    m = pkg.manifest
    names = {
        "tensorrt": "TensorrtExecutionProvider",
        "cuda": "CUDAExecutionProvider",
        "cpu": "CPUExecutionProvider",
    }
    avail = set(ort.get_available_providers())
    sess = ort.InferenceSession(
        str(pkg.model_path), providers=[names[p] for p in providers if names[p] in avail]
    )
    inputs = []
    for study in studies:
        items = [
            x for f in study.files for x in preprocess_instance(pydicom.dcmread(f), m.preprocessing)
        ]
        inputs.append(items)
    warm = np.stack(inputs[0][:batch_size])
    sess.run([m.output.name], {m.input.name: warm})
    per_study: list[float] = []
    started = time.perf_counter()
    for items in inputs:
        t = time.perf_counter()
        for i in range(0, len(items), batch_size):
            sess.run([m.output.name], {m.input.name: np.stack(items[i : i + batch_size])})
        per_study.append(time.perf_counter() - t)
    total = time.perf_counter() - started
    return {
        "seconds": total,
        "per_study_s": per_study,
        "provider": sess.get_providers()[0],
        "slices": sum(len(i) for i in inputs),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--slices", type=int, default=48)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--large", action="store_true", help="include the ResNet-50-sized model")
    p.add_argument("--providers", default="tensorrt,cuda,cpu")
    p.add_argument("--no-dicom-outputs", action="store_true", help="skip SEG/SR encoding")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="edge-inference-bench-"))
    print("== machine ==")
    print(
        f"  python {platform.python_version()}, onnxruntime {ort.__version__}, "
        f"providers available {ort.get_available_providers()}"
    )
    print(f"  run folder: {work}")
    packages = build_reference_packages(work / "models", large=args.large)
    studies = [
        make_study(
            work / "studies" / f"s{i}",
            modality="CT",
            slices=args.slices,
            size=args.size,
            seed=f"bench-{i}",
        )
        for i in range(args.studies)
    ]
    print(
        f"  {args.studies} CT studies x {args.slices} slices {args.size}x{args.size}; "
        f"DICOM outputs {'off' if args.no_dicom_outputs else 'on (SEG/SR)'}"
    )
    rows = []
    for package in packages:
        manifest = open_package(package).manifest
        batch = min(manifest.batch_size, InferenceConfig().max_batch_size)
        agent = agent_run(
            work / package.name, package, studies, providers, not args.no_dicom_outputs
        )
        raw = raw_run(package, studies, providers, batch)
        rows.append(
            {
                "model": manifest.name,
                "batch": batch,
                "provider": agent["provider"],
                "agent_slices_s": agent["slices"] / agent["seconds"],
                "raw_slices_s": raw["slices"] / raw["seconds"],
                "agent_studies_s": len(studies) / agent["seconds"],
                "raw_studies_s": len(studies) / raw["seconds"],
                "ratio": raw["seconds"] / agent["seconds"],
                "agent_p50_ms": pct(agent["per_study_s"], 50) * 1000,
                "agent_p95_ms": pct(agent["per_study_s"], 95) * 1000,
                "raw_p50_ms": pct(raw["per_study_s"], 50) * 1000,
                "raw_p95_ms": pct(raw["per_study_s"], 95) * 1000,
            }
        )
    print("\n== end-to-end (COMPLETE -> result stored) vs raw InferenceSession.run ==")
    print(
        f"{'model':<16} {'batch':>5} {'provider':<22} {'agent sl/s':>10} {'raw sl/s':>10} "
        f"{'agent/raw':>9} {'agent p50/p95 ms':>18} {'raw p50/p95 ms':>16}"
    )
    for r in rows:
        print(
            f"{r['model']:<16} {r['batch']:>5} {r['provider']:<22} "
            f"{r['agent_slices_s']:>10.1f} {r['raw_slices_s']:>10.1f} {r['ratio']:>9.2f} "
            f"{r['agent_p50_ms']:>8.0f}/{r['agent_p95_ms']:<9.0f}"
            f"{r['raw_p50_ms']:>7.0f}/{r['raw_p95_ms']:<8.0f}"
        )
    print(
        "\nnotes: per-study latency = one job (a series x a model); the agent reads and "
        "decodes the DICOM files, the raw loop gets preprocessed arrays; studies/s = "
        f"studies / total time ({statistics.mean([r['ratio'] for r in rows]):.2f} mean ratio)"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
