"""Results as standard DICOM objects, built with highdicom.

* SEG (binary) for segmentation masks, referencing the source images, with the model as the
  segment's algorithm identification (name, version, family "Artificial Intelligence").
* Comprehensive SR with a TID 1500 Measurement Report: area, volume, mean intensity for
  segmentations; per-label probabilities and the top label for classifications; the model
  name and version as the algorithm identification; the source images as evidence.

UIDs are derived from the result id, so re-encoding one result gives the same UIDs.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from edge_agent import __version__
from edge_agent.results.models import Result

MANUFACTURER = "Edge Agent"
MODEL_NAME = "edge-agent"
#: Our private coding scheme for model labels that have no standard code.
CODING_SCHEME = "99EDGEAI"
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902


def derived_uid(result_id: str, what: str) -> str:
    """A stable 2.25 UID for ``what`` (seg, sr, seg-series, ...) of one result."""
    return "2.25." + str(uuid.uuid5(uuid.UUID(result_id), what).int)


def _label_code(label: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(
        value=label.upper()[:16], scheme_designator=CODING_SCHEME, meaning=label
    )


def make_seg(result: Result, sources: Sequence[Dataset], masks: np.ndarray) -> Dataset:
    """Binary SEG of ``masks`` ([N, rows, cols] bool, one per source image, same order)."""
    label = str(result.findings["label"])
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=result.model_name,
            version=result.model_version,
            family=codes.cid7162.ArtificialIntelligence,
        ),
    )
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=masks.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=derived_uid(result.result_id, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(result.result_id, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=f"{MODEL_NAME} {__version__}; {result.model_name} {result.model_version}",
        device_serial_number="0",
        content_label="AI_SEG",
        content_description=f"{result.model_name} {result.model_version}"[:64],
        omit_empty_frames=True,  # standard practice: a slice without finding has no frame
    )


def make_sr(result: Result, sources: Sequence[Dataset]) -> Dataset:
    """Comprehensive SR (TID 1500) with the result's measurements/classification."""
    f = result.findings
    algo = hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version)
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    if result.task == "segmentation":
        for key, name, unit in (
            ("area_mm2_total", codes.SCT.Area, codes.UCUM.SquareMillimeter),
            ("volume_mm3", codes.SCT.Volume, codes.UCUM.CubicMillimeter),
            ("mean_intensity", codes.SCT.Mean, codes.UCUM.HounsfieldUnit),
        ):
            if f.get(key) is not None:
                measurements.append(
                    hd.sr.Measurement(name=name, value=float(f[key]), unit=unit, algorithm_id=algo)
                )
        finding = _label_code(str(f["label"]))
    else:
        for label, p in dict(f["probabilities"]).items():
            measurements.append(
                hd.sr.Measurement(
                    name=hd.sr.CodedConcept(
                        value=f"P-{label.upper()}"[:16],
                        scheme_designator=CODING_SCHEME,
                        meaning=f"Probability of {label}",
                    ),
                    value=float(p),
                    unit=codes.UCUM.NoUnits,
                    algorithm_id=algo,
                )
            )
        finding = _label_code(str(f["top_label"]))
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.SCT.Finding, value=finding))
    evaluations.append(
        hd.sr.QualitativeEvaluation(
            name=hd.sr.CodedConcept(
                value="CRITICAL", scheme_designator=CODING_SCHEME, meaning="Critical finding"
            ),
            value=hd.sr.CodedConcept(
                value="Y" if result.critical else "N",
                scheme_designator=CODING_SCHEME,
                meaning="Yes" if result.critical else "No",
            ),
        )
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(result.result_id, "tracking"),
            identifier=f"{result.model_name} {result.model_version} result"[:64],
        ),
        finding_type=finding,
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=derived_uid(result.result_id, "device"),
                name=MODEL_NAME,
                manufacturer_name=MANUFACTURER,
                model_name=result.model_name,
            ),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept(
            value="363679005", scheme_designator="SCT", meaning="Imaging"
        ),
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=derived_uid(result.result_id, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(result.result_id, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
