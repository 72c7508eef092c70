"""Results as standard DICOM objects, built with highdicom.

* SEG (binary) for segmentation masks, referencing the source images, with the model as the
  segment's algorithm identification (name, version, family "Artificial Intelligence") and
  the label's coded concept as the segmented property type.
* Comprehensive SR with a TID 1500 Measurement Report, as IHE AI Results (AIR) asks: an
  image library (TID 1600) of the source images; for a segmentation a volumetric ROI group
  (TID 1411) that references the SEG's segment, with area, volume and mean intensity (HU);
  for a classification one measurement group per label (its coded concept as the finding,
  DCM 122157 "Probability"); in every group a tracking identifier and UID, the model name
  and version as the algorithm identification, and whether the result is critical (LOINC
  73568-8 "Communication of Critical Results": SCT Yes / No); the source images (and the
  SEG) as evidence. A result that replaces an earlier one (a re-run, a new model version)
  names the earlier SR in its Predecessor Documents Sequence.
* Key Object Selection (KOS, "Of Interest") of a segmentation's key images: the slice with
  the largest cross-section of the finding and the first and last slices it is seen on.
  A classification has no KOS (it does not say where the finding is).

Codes: a label's concept comes from its model manifest (``output.codes``, e.g. SNOMED CT);
only a label without one gets a code of the private scheme :data:`CODING_SCHEME`, which is
then declared in the Coding Scheme Identification Sequence (0008,0110). Every other concept
is standard (SCT, DCM, LN, UCUM).

Each object has a Series Description naming the model and version, Series Date/Time of the
result, and a series number of its own per model and kind (:func:`series_number`), so a
viewer lists them as distinct, titled series. UIDs are derived from the result id, so
re-encoding one result gives the same UIDs.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from edge_agent import __version__
from edge_agent.results.models import Result
from hub_protocol.manifest import LabelCode

MANUFACTURER = "Edge Agent"
MODEL_NAME = "edge-agent"
#: The private coding scheme for model labels whose manifest gives no standard code.
CODING_SCHEME = "99EDGEAI"
#: LOINC 73568-8: the concept under which an SR says whether the result is critical
CRITICAL = hd.sr.CodedConcept(
    value="73568-8", scheme_designator="LN", meaning="Communication of Critical Results"
)
_KINDS = {"SEG": 1, "SR": 2, "KO": 3}


def derived_uid(result_id: str, what: str) -> str:
    """A stable 2.25 UID for ``what`` (seg, sr, seg-series, ...) of one result."""
    return "2.25." + str(uuid.uuid5(uuid.UUID(result_id), what).int)


def series_number(model_name: str, kind: str) -> int:
    """The series number of a model's ``kind`` (SEG, SR, KO) objects: 9000-9899, the last
    digit says the kind, the others come from the model name, so two models' series (and a
    model's SEG, SR and KOS) are told apart in a viewer. (Two model names can share the tens,
    1 in 90.)"""
    return 9000 + (zlib.crc32(model_name.encode()) % 90) * 10 + _KINDS[kind]


def label_code(label: str, label_codes: Mapping[str, LabelCode]) -> hd.sr.CodedConcept:
    """The coded concept for a model's label: the manifest's, else a private code."""
    c = label_codes.get(label)
    if c is not None:
        return hd.sr.CodedConcept(value=c.value, scheme_designator=c.scheme, meaning=c.meaning)
    return hd.sr.CodedConcept(
        value=label.upper()[:16], scheme_designator=CODING_SCHEME, meaning=label[:64]
    )


def _series(result: Result, kind: str, what: str) -> dict[str, Any]:
    """Series Description, Series and Content Date/Time (the result's, in the site's local
    time, as DICOM dates are) and number for one of ``result``'s objects."""
    when = time.localtime(result.created_at)
    return {
        "series_number": series_number(result.model_name, kind),
        "series_description": f"AI {what}: {result.model_name} {result.model_version}"[:64],
        "series_date": time.strftime("%Y%m%d", when),
        "series_time": time.strftime("%H%M%S", when),
        "content_date": time.strftime("%Y%m%d", when),
        "content_time": time.strftime("%H%M%S", when),
    }


def _declare_private(ds: Dataset) -> Dataset:
    """Declare the private coding scheme in (0008,0110) if the object uses it."""
    if CODING_SCHEME in _schemes_used(ds):
        item = Dataset()
        item.CodingSchemeDesignator = CODING_SCHEME
        item.CodingSchemeName = "Edge Agent model labels"
        item.CodingSchemeResponsibleOrganization = MANUFACTURER
        ds.CodingSchemeIdentificationSequence = [item]
    return ds


def _schemes_used(ds: Dataset) -> set[str]:
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "CodingSchemeDesignator":
                found.add(str(elem.value))

    walk(ds)
    return found


def make_seg(
    result: Result,
    sources: Sequence[Dataset],
    masks: np.ndarray,
    label_codes: Mapping[str, LabelCode] | None = None,
) -> Dataset:
    """Binary SEG of ``masks`` ([N, rows, cols] bool, one per source image, same order)."""
    label = str(result.findings["label"])
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=label_code(label, label_codes or {}),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=result.model_name,
            version=result.model_version,
            family=codes.cid7162.ArtificialIntelligence,
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=masks.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=derived_uid(result.result_id, "seg-series"),
        sop_instance_uid=derived_uid(result.result_id, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=f"{MODEL_NAME} {__version__}; {result.model_name} {result.model_version}",
        device_serial_number="0",
        content_label="AI_SEG",
        content_description=f"{result.model_name} {result.model_version}"[:64],
        omit_empty_frames=True,  # standard practice: a slice without finding has no frame
        **_series(result, "SEG", "segmentation"),
    )
    return _declare_private(seg)


def make_sr(
    result: Result,
    sources: Sequence[Dataset],
    label_codes: Mapping[str, LabelCode] | None = None,
    *,
    seg: Dataset | None = None,
    previous: Sequence[Dataset] = (),
) -> Dataset:
    """Comprehensive SR (TID 1500) with the result's measurements/classification; ``seg``
    is the result's SEG (its segment is the measured region), ``previous`` the SR(s) of the
    result this one replaces."""
    f = result.findings
    lc = label_codes or {}
    algo = hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version)
    critical = hd.sr.QualitativeEvaluation(
        name=CRITICAL, value=codes.SCT.Yes if result.critical else codes.SCT.No
    )

    def tracking(what: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(
            uid=derived_uid(result.result_id, f"tracking-{what}"),
            identifier=f"{result.model_name} {result.model_version} {what}"[:64],
        )

    def group(
        finding: hd.sr.CodedConcept,
        what: str,
        measurements: list[hd.sr.Measurement],
        evaluations: list[hd.sr.QualitativeEvaluation],
    ) -> (
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ):
        if seg is not None:  # the region measured is the SEG's segment (TID 1411)
            return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(what),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=1,
                    source_series=hd.sr.SourceSeriesForSegmentation(result.series_uid),
                ),
                finding_type=finding,
                algorithm_id=algo,
                measurements=measurements,
                qualitative_evaluations=evaluations,
            )
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(what),
            finding_type=finding,
            algorithm_id=algo,
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )

    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    if result.task == "segmentation":
        measurements = []
        for key, name, unit in (
            ("area_mm2_total", codes.SCT.Area, codes.UCUM.SquareMillimeter),
            ("volume_mm3", codes.SCT.Volume, codes.UCUM.CubicMillimeter),
            ("mean_intensity", codes.SCT.Mean, codes.UCUM.HounsfieldUnit),
        ):
            if f.get(key) is not None:
                measurements.append(
                    hd.sr.Measurement(name=name, value=float(f[key]), unit=unit, algorithm_id=algo)
                )
        label = str(f["label"])
        groups.append(group(label_code(label, lc), label, measurements, [critical]))
    else:
        top = str(f["top_label"])
        probabilities = dict(f["probabilities"])
        # the top label first, with whether the result is critical; then the others
        for label in sorted(probabilities, key=lambda x: x != top):
            probability = hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=float(probabilities[label]),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algo,
            )
            evaluations = [critical] if label == top else []
            groups.append(group(label_code(label, lc), label, [probability], evaluations))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device(result)),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        referenced_images=list(sources),  # the image library (TID 1600)
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[*sources, *([seg] if seg is not None else [])],
        content=report,
        series_instance_uid=derived_uid(result.result_id, "sr-series"),
        sop_instance_uid=derived_uid(result.result_id, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=list(previous) or None,
        **_series(result, "SR", "report"),
    )
    return _declare_private(sr)


def _device(result: Result) -> hd.sr.ObserverContext:
    """The agent running the model, as the observer (device) of an SR or KOS."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(result.result_id, "device"),
            name=MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=result.model_name,
        ),
    )


def key_images(sources: Sequence[Dataset], masks: np.ndarray) -> list[Dataset]:
    """A segmentation's key images (``masks`` [N, rows, cols] bool, one per source): the
    slice with the largest cross-section of the finding, then the first and last slices it
    is seen on (in ``sources``' order), each once. None when the mask is empty."""
    areas = masks.reshape(masks.shape[0], -1).sum(axis=1)
    seen = np.flatnonzero(areas)
    if seen.size == 0:
        return []
    picks = [int(np.argmax(areas)), int(seen[0]), int(seen[-1])]
    return [sources[i] for i in dict.fromkeys(picks)]


def make_kos(result: Result, keys: Sequence[Dataset]) -> Dataset:
    """Key Object Selection ("Of Interest", DCM 113000) of ``keys``."""
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=list(keys),
        observer_device_context=_device(result),
        description=f"Key images of {result.model_name} {result.model_version}",
    )
    series = _series(result, "KO", "key images")
    del series["content_date"], series["content_time"]  # the KOS sets its own
    return hd.ko.KeyObjectSelectionDocument(
        evidence=list(keys),
        content=content,
        series_instance_uid=derived_uid(result.result_id, "ko-series"),
        sop_instance_uid=derived_uid(result.result_id, "ko"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        **series,
    )
