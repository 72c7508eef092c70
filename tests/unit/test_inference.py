"""Model packages, reference models, preprocessing and the ONNX Runtime runner."""

from __future__ import annotations

import copy
import io
import json
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydicom
import pytest

from edge_agent.inference.preprocess import (
    UnsupportedPixels,
    preprocess_instance,
    resize_bilinear,
    window_linear,
)
from edge_agent.inference.reference_models import (
    CLS_NAME,
    SEG_NAME,
    build_reference_packages,
    reference_lesion_mask,
)
from edge_agent.inference.runner import ModelLoadError, ModelRunner, NoProvider, choose_providers
from edge_agent.inference.selftest import SelfTestFailed
from hub_protocol.manifest import ManifestError, parse_manifest, parse_semver
from hub_protocol.package import PackageError, open_package, write_manifest_files
from tests.conftest import TEST_FILES


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    roots = build_reference_packages(tmp_path_factory.mktemp("models"))
    return {r.name.rsplit("-", 1)[0]: r for r in roots}


def manifest_dict(packages: dict[str, Path], name: str = SEG_NAME) -> dict[str, Any]:
    return dict(json.loads((packages[name] / "manifest.json").read_text()))


# -- manifest ---------------------------------------------------------------------------------


def _broken(m: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    m = copy.deepcopy(m)
    *parents, leaf = path.split(".")
    node = m
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return m


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("name", KeyError, "name"),
        ("name", "Bad Name!", "name"),
        ("version", "1.0", "version"),
        ("task", "regression", "task"),
        ("input.dtype", "int8", "input.dtype"),
        ("input.shape", [1, 2, 3], "input.shape"),
        ("preprocessing.window", {"center": 40, "width": 0}, "preprocessing.window.width"),
        ("preprocessing.colour", True, "preprocessing.colour"),
        ("output.labels", [], "output.labels"),
        ("routing.series_description", "([unclosed", "routing.series_description"),
        ("self_test.expect", KeyError, "self_test.expect"),
        ("model_file", "other.onnx", "model_file"),
        ("output.critical", {"tumour": 1.0}, "output.critical"),
        (
            "output.codes",
            {"tumour": {"scheme": "SCT", "value": "1", "meaning": "x"}},
            "output.codes",
        ),
        (
            "output.codes",
            {"lesion": {"scheme": "SCT", "value": "1"}},
            "output.codes.lesion.meaning",
        ),
        ("preprocessing.channels", 3, "preprocessing.channels"),
        ("files", {"../model.onnx": {"sha256": "0" * 64, "size": 1}}, "files"),
    ],
)
def test_manifest_errors_name_the_field(
    packages: dict[str, Path], path: str, value: Any, field: str
) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(_broken(manifest_dict(packages), path, value))
    assert err.value.field == field, err.value


def test_a_label_without_a_code_gets_a_declared_private_one(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    """A third-party model whose manifest codes no label: its SR uses the private scheme
    and declares it in (0008,0110); with the manifest's code it uses that instead."""
    import pydicom

    from edge_agent.results.dicom import CODING_SCHEME, make_sr
    from edge_agent.results.models import Result, uuid7
    from edge_agent.samples import make_study
    from hub_protocol.manifest import LabelCode

    study = make_study(tmp_path, slices=2, size=64)
    sources = [pydicom.dcmread(f) for f in study.files]
    result = Result(
        result_id=uuid7(), job_id=1, study_uid=study.study_uid,
        series_uid=str(sources[0].SeriesInstanceUID), model_name="third-party",
        model_version="2.0.0", model_sha256="0" * 64, provider="cpu", task="classification",
        findings={"probabilities": {"calc": 0.8, "clear": 0.2}, "top_label": "calc"},
        critical=False, instances=2, preprocess_ms=0, inference_ms=0, created_at=1.7e9,
    )  # fmt: skip
    private = make_sr(result, sources)
    (declared,) = private.CodingSchemeIdentificationSequence
    assert declared.CodingSchemeDesignator == CODING_SCHEME
    coded = make_sr(
        result,
        sources,
        {
            "calc": LabelCode(scheme="SCT", value="18115005", meaning="Calcification"),
            "clear": LabelCode(scheme="SCT", value="17621005", meaning="Normal"),
        },
    )
    assert "CodingSchemeIdentificationSequence" not in coded
    assert CODING_SCHEME not in str(coded)


def test_manifest_not_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{nope")


def test_semver_order() -> None:
    versions = ["1.0.0-alpha", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0", "10.0.0"]
    assert sorted(versions, key=parse_semver) == versions
    # semver.org section 11: numeric identifiers as numbers, before alphanumeric ones; a
    # longer list after its prefix; build metadata ignored
    spec = [
        "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
        "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0-rc.2", "1.0.0-rc.10", "1.0.0",
    ]  # fmt: skip
    assert sorted(random.Random(7).sample(spec, len(spec)), key=parse_semver) == spec
    assert parse_semver("1.0.0-rc.10") > parse_semver("1.0.0-rc.2")
    assert parse_semver("1.0.0+build.5") == parse_semver("1.0.0")


# -- packages ---------------------------------------------------------------------------------


def _tar(src: Path, dest: Path, extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(dest, "w") as tar:
        for p in sorted(src.iterdir()):
            tar.add(p, arcname=p.name)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return dest


def test_tar_package_loads(packages: dict[str, Path], tmp_path: Path) -> None:
    pkg = open_package(_tar(packages[SEG_NAME], tmp_path / "p.tar"), staging=tmp_path / "st")
    assert pkg.manifest.name == SEG_NAME and pkg.model_path.is_file()
    assert pkg.root.parent == tmp_path / "st"


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil", "a/../../evil"])
def test_tar_path_traversal_rejected(
    packages: dict[str, Path], tmp_path: Path, member: str
) -> None:
    info = tarfile.TarInfo(member)
    info.size = 1
    with pytest.raises(PackageError, match="escapes"):
        open_package(_tar(packages[SEG_NAME], tmp_path / "p.tar", [info]), staging=tmp_path / "s")
    assert not (tmp_path / "evil.txt").exists()
    assert not list((tmp_path / "s").iterdir())  # nothing left behind


def test_tar_symlink_rejected(packages: dict[str, Path], tmp_path: Path) -> None:
    info = tarfile.TarInfo("model2.onnx")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    with pytest.raises(PackageError, match="links"):
        open_package(_tar(packages[SEG_NAME], tmp_path / "p.tar", [info]), staging=tmp_path)


def _copy(packages: dict[str, Path], tmp_path: Path, name: str = SEG_NAME) -> Path:
    dest = tmp_path / "pkg"
    shutil.copytree(packages[name], dest)
    return dest


def test_tampered_model_rejected(packages: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(packages, tmp_path)
    data = bytearray((root / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (root / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="SHA-256"):
        open_package(root)


def test_size_mismatch_and_extra_file_rejected(packages: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(packages, tmp_path)
    with (root / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(PackageError, match="size"):
        open_package(root)
    root2 = _copy(packages, tmp_path / "b")
    (root2 / "notes.txt").write_text("hi")
    with pytest.raises(PackageError, match="not listed"):
        open_package(root2)


# -- preprocessing --------------------------------------------------------------------------------


def test_window_linear_matches_the_standard() -> None:
    x = np.array([-1000.0, -160.0, -159.5, 40.0, 239.5, 240.0, 3000.0])
    c, w = 40.0, 400.0
    expected = np.clip(((x - (c - 0.5)) / (w - 1)) + 0.5, 0, 1)
    assert np.allclose(window_linear(x, c, w), expected)
    assert window_linear(np.array([c - 0.5]), c, w)[0] == pytest.approx(0.5)


def test_resize_bilinear() -> None:
    img = np.arange(16, dtype=float).reshape(4, 4)
    assert np.array_equal(resize_bilinear(img, 4, 4), img)
    down = resize_bilinear(img, 2, 2)
    assert np.allclose(down, [[2.5, 4.5], [10.5, 12.5]])  # means of the 2x2 blocks
    up = resize_bilinear(np.array([[0.0, 1.0]]), 1, 4)
    assert np.allclose(up, [[0.0, 0.25, 0.75, 1.0]])


def test_modality_lut_and_channels(packages: dict[str, Path]) -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    seg = open_package(packages[SEG_NAME]).manifest.preprocessing
    (x,) = preprocess_instance(ds, seg)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert x.shape == (1, 128, 128) and x.dtype == np.float32
    assert np.allclose(x[0], hu)
    cls = open_package(packages[CLS_NAME]).manifest.preprocessing
    (y,) = preprocess_instance(ds, cls)
    expected = (resize_bilinear(window_linear(hu, 40, 400), 64, 64) - 0.5) / 0.25
    assert y.shape == (3, 64, 64)
    assert np.allclose(y[0], expected, atol=1e-5) and np.array_equal(y[0], y[2])


def test_compressed_pixels_decoded_like_uncompressed(packages: dict[str, Path]) -> None:
    pre = open_package(packages[SEG_NAME]).manifest.preprocessing
    plain = preprocess_instance(pydicom.dcmread(TEST_FILES / "MR_small.dcm"), pre)
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        other = preprocess_instance(pydicom.dcmread(TEST_FILES / name), pre)
        assert np.array_equal(plain[0], other[0]), name


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "rtplan.dcm"])
def test_unsupported_pixels(packages: dict[str, Path], name: str) -> None:
    pre = open_package(packages[SEG_NAME]).manifest.preprocessing
    with pytest.raises(UnsupportedPixels):
        preprocess_instance(pydicom.dcmread(TEST_FILES / name), pre)


# -- runner and reference models ----------------------------------------------------------------


def test_choose_providers() -> None:
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["tensorrt", "cuda", "cpu"], avail) == avail
    assert choose_providers(["cpu"], avail) == ["CPUExecutionProvider"]
    with pytest.raises(NoProvider):
        choose_providers(["tensorrt"], avail)
    with pytest.raises(ValueError, match="unknown"):
        choose_providers(["tpu"], avail)


def test_segmentation_mask_and_area_match_numpy(packages: dict[str, Path]) -> None:
    runner = ModelRunner(open_package(packages[SEG_NAME]), providers=["cpu"])
    assert runner.provider == "CPUExecutionProvider"
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    items = preprocess_instance(ds, runner.manifest.preprocessing)
    mask, stats = runner.infer(items)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = reference_lesion_mask(hu)
    assert mask.shape == (1, 1, 128, 128)
    assert np.array_equal(mask[0, 0], expected)
    assert 0 < expected.sum() < expected.size  # the test image has some soft tissue, not all
    dy, dx = (float(v) for v in ds.PixelSpacing)
    assert float(mask.sum()) * dy * dx == pytest.approx(float(expected.sum()) * dy * dx)
    assert stats.items == 1 and stats.batches == 1


def test_segmentation_on_synthetic_ct_finds_the_lesion(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    from edge_agent.samples import make_study

    study = make_study(tmp_path, modality="CT", slices=5, size=128, seed="seg")
    runner = ModelRunner(open_package(packages[SEG_NAME]), providers=["cpu"])
    dss = [pydicom.dcmread(p) for p in study.files]
    items = [x for ds in dss for x in preprocess_instance(ds, runner.manifest.preprocessing)]
    masks, stats = runner.infer(items)
    assert stats.batches == 1  # 5 slices, batch size 8
    hu = np.stack([ds.pixel_array * 1.0 - 1024 for ds in dss])
    assert np.array_equal(masks[:, 0], reference_lesion_mask(hu))
    assert masks[2].sum() > 100  # the lesion is largest in the middle slice


def test_classifier_probabilities_batched_and_deterministic(packages: dict[str, Path]) -> None:
    pkg = open_package(packages[CLS_NAME])
    a = ModelRunner(pkg, providers=["cpu"], max_batch_size=2)
    b = ModelRunner(pkg, providers=["cpu"], max_batch_size=16)
    rng = np.random.default_rng(3)
    items = [rng.standard_normal((3, 64, 64)).astype(np.float32) for _ in range(5)]
    pa, sa = a.infer(items)
    pb, sb = b.infer(items)
    assert (sa.batches, sb.batches) == (3, 1)
    assert pa.shape == (5, 3)
    assert np.allclose(pa.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(pa, pb, atol=1e-6)
    again, _ = a.infer(items)
    assert np.array_equal(pa, again)


def test_corrupt_model_is_a_clear_load_error(packages: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(packages, tmp_path)
    (root / "model.onnx").write_bytes(b"this is not an onnx model")
    m = json.loads((root / "manifest.json").read_text())
    write_manifest_files(root, m)  # hashes now match the corrupt bytes: only ORT can tell
    with pytest.raises(ModelLoadError, match=r"cannot load model\.onnx"):
        ModelRunner(open_package(root), providers=["cpu"])


def test_failing_self_test_refuses_the_model(packages: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(packages, tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    m["self_test"]["expect"]["mean"] += 0.25
    write_manifest_files(root, m)
    with pytest.raises(SelfTestFailed, match="self-test"):
        ModelRunner(open_package(root), providers=["cpu"])


gpu = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="no CUDA execution provider in this onnxruntime build (CPU-only machine)",
)


@gpu
def test_cuda_provider_matches_cpu(packages: dict[str, Path]) -> None:  # pragma: no cover
    pkg = open_package(packages[CLS_NAME])
    cpu = ModelRunner(pkg, providers=["cpu"])
    cuda = ModelRunner(pkg, providers=["cuda"])
    assert cuda.provider == "CUDAExecutionProvider"
    items = [
        np.random.default_rng(i).standard_normal((3, 64, 64)).astype(np.float32) for i in range(8)
    ]
    assert np.allclose(cpu.infer(items)[0], cuda.infer(items)[0], atol=1e-3)
