"""The model package manifest (``manifest.json``): its JSON Schema and typed view.

A model package is a folder (or a ``.tar`` of one) holding ``manifest.json`` and the files it
lists, at least the ONNX model. The manifest says what the model is (name, semantic version,
task), what it takes (input tensor spec and how to turn DICOM pixels into it), what it gives
(output spec, labels, thresholds, which findings are critical), which series it applies to
(routing rule), how to check it works (self-test) and the SHA-256 and size of every file.

:func:`parse_manifest` validates against :data:`MANIFEST_SCHEMA` and raises
:class:`ManifestError` naming the offending field (``preprocessing.window.width``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from hub_protocol.errors import PermanentError
from hub_protocol.semver import SEMVER_RE, SemverKey
from hub_protocol.semver import parse as semver_parse

SCHEMA_VERSION = 1

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"}
_FILE = {"type": "string", "pattern": r"^(?!/)(?!.*\.\.)[A-Za-z0-9._/-]{1,200}$"}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Edge agent model package manifest",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema_version",
        "name",
        "version",
        "task",
        "model_file",
        "files",
        "input",
        "preprocessing",
        "output",
        "routing",
        "self_test",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "name": _NAME,
        "version": {"type": "string", "pattern": SEMVER_RE.pattern},
        "description": {"type": "string", "maxLength": 2000},
        "task": {"enum": ["classification", "segmentation", "detection"]},
        "model_file": _FILE,
        "files": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": _FILE,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["sha256", "size"],
                "properties": {
                    "sha256": _SHA256,
                    "size": {"type": "integer", "minimum": 0},
                },
            },
        },
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 1024},
        "input": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "shape", "dtype", "layout"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "shape": {
                    "type": "array",
                    "minItems": 4,
                    "maxItems": 4,
                    "items": {"type": "integer", "minimum": -1},
                },
                "dtype": {"enum": ["float32", "float16"]},
                "layout": {"const": "NCHW"},
            },
        },
        "preprocessing": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "modality_lut": {"type": "boolean"},
                "window": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["center", "width"],
                    "properties": {
                        "center": {"type": "number"},
                        "width": {"type": "number", "exclusiveMinimum": 0},
                    },
                },
                "clip": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {"type": "number"},
                },
                "resize": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {"type": "integer", "minimum": 1, "maximum": 8192},
                },
                "normalize": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["mean", "std"],
                    "properties": {
                        "mean": {"type": "number"},
                        "std": {"type": "number", "exclusiveMinimum": 0},
                    },
                },
                "channels": {"enum": [1, 3]},
            },
        },
        "output": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "labels"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "activation": {"enum": ["none", "softmax", "sigmoid"]},
                "labels": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "minLength": 1},
                },
                "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                "codes": {
                    "type": "object",
                    "description": "label -> the coded concept it stands for in DICOM results "
                    "(e.g. SNOMED CT); a label without one gets a private code",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["scheme", "value", "meaning"],
                        "properties": {
                            "scheme": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,16}$"},
                            "value": {"type": "string", "minLength": 1, "maxLength": 64},
                            "meaning": {"type": "string", "minLength": 1, "maxLength": 64},
                        },
                    },
                },
                "critical": {
                    "type": "object",
                    "description": "label -> probability (classification) or mask area in mm2 "
                    "(segmentation) at or above which a finding is critical",
                    "additionalProperties": {"type": "number", "minimum": 0},
                },
            },
        },
        "routing": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "modality": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "body_part": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "sop_class": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "series_description": {"type": "string", "format": "regex"},
                "min_rows": {"type": "integer", "minimum": 1},
                "min_columns": {"type": "integer", "minimum": 1},
                "min_slices": {"type": "integer", "minimum": 1},
                "max_slices": {"type": "integer", "minimum": 1},
            },
        },
        "self_test": {
            "type": "object",
            "additionalProperties": False,
            "required": ["input", "expect"],
            "properties": {
                "input": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["generator"],
                    "properties": {
                        "generator": {"enum": ["ramp", "constant", "normal"]},
                        "low": {"type": "number"},
                        "high": {"type": "number"},
                        "value": {"type": "number"},
                        "seed": {"type": "integer", "minimum": 0},
                        "batch": {"type": "integer", "minimum": 1, "maximum": 64},
                    },
                },
                "expect": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["mean", "std", "atol"],
                    "properties": {
                        "mean": {"type": "number"},
                        "std": {"type": "number", "minimum": 0},
                        "atol": {"type": "number", "exclusiveMinimum": 0},
                    },
                },
            },
        },
    },
}


class ManifestError(PermanentError):
    """The manifest is invalid; ``field`` is the dotted path of the offending value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"manifest {field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    name: str
    shape: tuple[int, int, int, int]  # N, C, H, W; -1 = dynamic
    dtype: Literal["float32", "float16"]
    layout: str = "NCHW"


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    modality_lut: bool = True
    window: tuple[float, float] | None = None  # (center, width)
    clip: tuple[float, float] | None = None
    resize: tuple[int, int] | None = None  # (rows, columns)
    normalize: tuple[float, float] | None = None  # (mean, std)
    channels: int = 1


@dataclass(frozen=True, kw_only=True)
class LabelCode:
    """The coded concept a label stands for (scheme designator, code value, meaning)."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    name: str
    labels: tuple[str, ...]
    activation: str = "none"
    threshold: float = 0.5
    critical: Mapping[str, float] = field(default_factory=dict)
    codes: Mapping[str, LabelCode] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RoutingRule:
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    series_description: str | None = None
    min_rows: int | None = None
    min_columns: int | None = None
    min_slices: int | None = None
    max_slices: int | None = None


@dataclass(frozen=True, kw_only=True)
class SelfTest:
    generator: str
    low: float = 0.0
    high: float = 1.0
    value: float = 0.0
    seed: int = 0
    batch: int = 1
    mean: float = 0.0
    std: float = 0.0
    atol: float = 1e-4


@dataclass(frozen=True, kw_only=True)
class Manifest:
    name: str
    version: str
    task: str
    model_file: str
    files: Mapping[str, FileEntry]
    input: InputSpec
    preprocessing: Preprocessing
    output: OutputSpec
    routing: RoutingRule
    self_test: SelfTest
    batch_size: int = 1
    description: str = ""

    @property
    def semver(self) -> SemverKey:
        """(major, minor, patch, pre-release) for ordering; a release sorts after its
        pre-releases (``1.0.0-rc.1`` < ``1.0.0``)."""
        return parse_semver(self.version)


def parse_semver(version: str) -> SemverKey:
    """See :func:`hub_protocol.semver.parse`; raises ManifestError naming ``version``."""
    try:
        return semver_parse(version)
    except ValueError as exc:
        raise ManifestError("version", str(exc)) from exc


def _field_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        missing = re.search(r"'([^']+)' is a required property", error.message)
        if missing:
            parts.append(missing.group(1))
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)'", error.message)
        if extra:
            parts.append(extra[0])
    return ".".join(parts) or "(root)"


def parse_manifest(raw: bytes | str | Mapping[str, Any]) -> Manifest:
    """Validate a manifest (JSON text or already-decoded) and return its typed view.

    Raises :class:`ManifestError` naming the first offending field.
    """
    if isinstance(raw, bytes | str):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError("(root)", f"not valid JSON: {exc}") from exc
    else:
        data = dict(raw)
    validator = jsonschema.Draft202012Validator(
        MANIFEST_SCHEMA, format_checker=jsonschema.FormatChecker()
    )
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise ManifestError(_field_path(err), err.message)
    if data["model_file"] not in data["files"]:
        raise ManifestError("model_file", f"{data['model_file']!r} is not listed in files")
    pre, out, rt, st = (data["preprocessing"], data["output"], data["routing"], data["self_test"])
    for what in ("critical", "codes"):
        unknown = set(out.get(what, {})) - set(out["labels"])
        if unknown:
            raise ManifestError(f"output.{what}", f"unknown label(s) {sorted(unknown)}")
    if "clip" in pre and pre["clip"][0] >= pre["clip"][1]:
        raise ManifestError("preprocessing.clip", "low must be below high")
    shape = tuple(data["input"]["shape"])
    channels = int(pre.get("channels", 1))
    if shape[1] not in (-1, channels):
        raise ManifestError(
            "preprocessing.channels", f"{channels} does not match input.shape[1] = {shape[1]}"
        )
    if "resize" in pre and -1 not in shape[2:] and tuple(pre["resize"]) != shape[2:]:
        raise ManifestError("preprocessing.resize", f"{pre['resize']} != input.shape[2:]")
    window = pre.get("window")
    norm = pre.get("normalize")
    return Manifest(
        name=data["name"],
        version=data["version"],
        task=data["task"],
        description=data.get("description", ""),
        model_file=data["model_file"],
        files={k: FileEntry(sha256=v["sha256"], size=v["size"]) for k, v in data["files"].items()},
        batch_size=int(data.get("batch_size", 1)),
        input=InputSpec(
            name=data["input"]["name"],
            shape=shape,
            dtype=data["input"]["dtype"],
            layout=data["input"]["layout"],
        ),
        preprocessing=Preprocessing(
            modality_lut=bool(pre.get("modality_lut", True)),
            window=(float(window["center"]), float(window["width"])) if window else None,
            clip=(float(pre["clip"][0]), float(pre["clip"][1])) if "clip" in pre else None,
            resize=(int(pre["resize"][0]), int(pre["resize"][1])) if "resize" in pre else None,
            normalize=(float(norm["mean"]), float(norm["std"])) if norm else None,
            channels=channels,
        ),
        output=OutputSpec(
            name=out["name"],
            labels=tuple(out["labels"]),
            activation=out.get("activation", "none"),
            threshold=float(out.get("threshold", 0.5)),
            critical={k: float(v) for k, v in out.get("critical", {}).items()},
            codes={
                k: LabelCode(scheme=v["scheme"], value=v["value"], meaning=v["meaning"])
                for k, v in out.get("codes", {}).items()
            },
        ),
        routing=RoutingRule(
            modality=tuple(m.upper() for m in rt.get("modality", ())),
            body_part=tuple(b.upper() for b in rt.get("body_part", ())),
            sop_class=tuple(rt.get("sop_class", ())),
            series_description=rt.get("series_description"),
            min_rows=rt.get("min_rows"),
            min_columns=rt.get("min_columns"),
            min_slices=rt.get("min_slices"),
            max_slices=rt.get("max_slices"),
        ),
        self_test=SelfTest(
            generator=st["input"]["generator"],
            low=float(st["input"].get("low", 0.0)),
            high=float(st["input"].get("high", 1.0)),
            value=float(st["input"].get("value", 0.0)),
            seed=int(st["input"].get("seed", 0)),
            batch=int(st["input"].get("batch", 1)),
            mean=float(st["expect"]["mean"]),
            std=float(st["expect"]["std"]),
            atol=float(st["expect"]["atol"]),
        ),
    )
