"""The `infer` step, provider site:
study from the gateway → AI service → DICOM SEG + SR back to the gateway by STOW-RS.

Inputs: pseudonymized-study-instance-uid (required), ai-service-identifier, study-location.
Outputs: result-location (DICOMweb URL of the study holding the results), result-study-instance-uid
(both declared in the spec and sent back), result-series-uids (SEG,SR) and status ("completed")
for local callers. No FHIR here: the requester's `return` step makes the FHIR result
(DiagnosticReport, Observations, Device, Provenance) from the SR after re-identification
(`results.fhir_bundle_from_report`), so it names the real patient and study; one made here
would name the pseudonyms and never travel back (the work item does not declare it).

Site configuration (`ctx.site`, omi_dsf.steps.settings): gateway_url, gateway_ca_file (the
provider's OMI gateway and the CA of its certificate), ai_service_url and ai_model, or ai_services
(per ai-service-identifier a service with the peer keys and, for a server whose model metadata has no
parameters (KServe), `device`: the model's Device in the registry, its URL read with
device_ca_file, or a file holding it; `grpc_url`: the server's OIP v2 gRPC port, for KServe and
MLServer), ai_timeout_s.

What the step needs beyond the protocol (modality, slice limits, label meaning, algorithm name and
version) comes from the model metadata's "parameters" (the reference service, MLServer), else from
the Device (`omi_dsf/registry/device.py`). Tensors travel as raw bytes over gRPC when `grpc_url` is
given, else binary where the server's HTTP has the extension (`OipClient.binary_tensors`), else JSON.

Failures the requester must fix (wrong modality, gaps between slices, too many slices, an
unknown service) raise `StepError`; an unreachable or slow service or gateway raises
other exceptions, which the worker runtime retries. A service that says it is busy (its limit on
requests at once, with Retry-After) is asked again after that wait, for up to ai_timeout_s, before
the runtime's retries: with a cohort in flight, studies queue at the provider instead of failing. Result UIDs are deterministic, so a
retry after a crash stores the same objects again rather than new ones.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from omi_dsf.dicomweb_client import DicomwebClient, DicomwebRefused
from omi_dsf.inference import client as oip
from omi_dsf.inference.config import AiServiceSettings
from omi_dsf.inference import transfer
from omi_dsf.inference import results
from omi_dsf.inference.volume import VolumeError, build_volume, pick_series
from omi_dsf.peer import Peer, PeerConfigError
from omi_dsf.registry import device
from omi_dsf.steps.api import Answers, StepContext, StepError, Timings, text_input
from omi_dsf.steps.settings import StepSettings
MODALITY_TAG, SERIES_UID_TAG, COUNT_TAG = "00080060", "0020000E", "00201209"
BUSY_WAIT_MAX_S = 5.0      # the longest wait between asks of a busy AI service (its Retry-After, capped)

# highdicom logs study/series/SOP instance UIDs at INFO; UIDs count as identifying.
logging.getLogger("highdicom").setLevel(logging.WARNING)


def _service(inputs: Answers, site: StepSettings, timeout: float) -> tuple[Peer, str, Any, str | None]:
    """The requested service as a peer (URL, TLS, token), the model name, its `device` setting
    (a registry URL as a Peer, a file path, or None) and its `grpc_url`."""
    identifier = str(inputs.get("ai-service-identifier", "") or "")
    services = site.ai_services
    try:
        if identifier and identifier in services:
            entry = services[identifier]
            peer = entry.peer(entry.url, f"ai_services.{identifier}", timeout=timeout)
            peer.ssl_context(), peer.token()   # a file that does not load: the requester's to fix, now
            return peer, entry.model, _device_setting(entry, identifier, timeout), entry.grpc_url
        if not site.ai_service_url:
            known = ", ".join(services) or "none configured"
            raise StepError(f"AI service '{identifier}' is not offered at this site (services: {known})")
        return (Peer(url=site.ai_service_url.rstrip("/"), timeout=timeout, where="ai_service_url"), site.ai_model,
                None, None)
    except PeerConfigError as exc:
        raise StepError(str(exc)) from None


def _device_setting(entry: AiServiceSettings, identifier: str, timeout: float) -> Peer | Path | None:
    """The service's `device` setting: a registry URL as a Peer (with device_ca_file), a file, or None."""
    if not entry.device:
        return None
    if isinstance(entry.device, Path):
        return entry.device
    ca_file = str(entry.device_ca_file) if entry.device_ca_file else None
    return Peer(url=entry.device, ca_file=ca_file, timeout=timeout, where=f"ai_services.{identifier}.device")


def _model_parameters(meta: dict, model: str, device_setting: Peer | Path | None) -> dict:
    """What the step needs beyond the protocol: the model metadata's parameters when they state a
    modality, else the model's Device entry."""
    params = meta.get("parameters")
    if isinstance(params, dict) and "modality" in params:
        return params
    if device_setting is None:
        raise StepError(f"model '{model}': its metadata states no modality, slice limits or labels (its server "
                        f"carries no model parameters): give the service's `device` in the site's ai_services "
                        f"(its Device in the registry)")
    try:
        if isinstance(device_setting, Path):
            try:
                found = json.loads(device_setting.read_text())
            except (OSError, ValueError) as exc:
                raise device.DeviceError(f"{device_setting}: {exc}") from None
        else:
            found = device.fetch(device_setting)
        return device.model_parameters(found if isinstance(found, dict) else {})
    except device.DeviceUnavailable:
        raise
    except device.DeviceError as exc:
        raise StepError(f"model '{model}': {exc}") from None


def _check_labels(params: dict, model: str) -> None:
    """The SEG names segment 1 the right lung and 2 the left one: a model whose labels mean
    something else would be stored under the wrong names."""
    labels = params.get("labels")
    if not isinstance(labels, dict):
        return
    for number, _, _, meaning in results.SEGMENTS:
        said = str(labels.get(str(number), ""))
        if said.strip().lower() != meaning.lower():
            raise StepError(f"model '{model}' labels {number} as {said[:60]!r}; this step stores label {number} "
                            f"as {meaning.lower()!r}")


def _gateway_url(inputs: Answers, site: StepSettings, study_uid: str) -> str:
    if site.gateway_url:
        return site.gateway_url.rstrip("/")
    location = str(inputs.get("study-location", "") or "")
    suffix = f"/studies/{study_uid}"
    if location.endswith(suffix):
        return location[: -len(suffix)]
    raise StepError("no DICOMweb gateway: site has no gateway_url and study-location is not <base>/studies/<uid>")


def _value(item: dict, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _choose_series(dicomweb: DicomwebClient, study_uid: str, modality: str, max_slices: int | None) -> str:
    """Pick the largest series of `modality` by QIDO, before downloading anything."""
    try:
        found = dicomweb.search_for_series(study_uid, fields=[MODALITY_TAG, COUNT_TAG])
    except DicomwebRefused as exc:
        if exc.status in (400, 404):
            raise StepError(f"the gateway does not know study {study_uid} (QIDO: HTTP {exc.status})") from None
        raise
    if not found:
        raise StepError(f"study {study_uid} is not at the gateway (no series found)")
    candidates = [(int(_value(s, COUNT_TAG) or 0), str(_value(s, SERIES_UID_TAG))) for s in found
                  if _value(s, MODALITY_TAG) == modality]
    if not candidates:
        modalities = sorted({str(_value(s, MODALITY_TAG)) for s in found})
        raise StepError(f"study has no {modality} series (modalities found: {', '.join(modalities)}); "
                        f"the model needs {modality}")
    count, series_uid = max(candidates)
    if max_slices is not None and count > max_slices:
        raise StepError(f"series has {count} slices, more than the model's limit of {max_slices}")
    return series_uid


def infer(inputs: Answers, ctx: StepContext) -> Answers:
    answers, timings = infer_timed(inputs, ctx)
    ctx.log.info("infer %s: timings %s", ctx.business_key, timings.summary())
    return answers


def infer_timed(inputs: Answers, ctx: StepContext) -> tuple[Answers, Timings]:
    """`infer`, also answering how long each phase took."""
    study_uid = text_input(inputs, "pseudonymized-study-instance-uid")
    gateway = _gateway_url(inputs, ctx.site, study_uid)
    timeout = ctx.site.ai_timeout_s
    ca_file = ctx.site.gateway_ca_file
    try:
        peer = Peer(url=gateway, ca_file=str(ca_file) if ca_file else None, timeout=timeout, where="gateway_url")
    except PeerConfigError as exc:
        raise StepError(str(exc)) from None
    with DicomwebClient(peer) as dicomweb:   # one connection pool to the gateway for the whole step
        return _infer(inputs, ctx, study_uid, dicomweb, timeout)


def _infer(inputs: Answers, ctx: StepContext, study_uid: str, dicomweb: DicomwebClient,
           timeout: float) -> tuple[Answers, Timings]:
    t = Timings()
    service, model, device_setting, grpc_url = _service(inputs, ctx.site, timeout)
    gateway = dicomweb.url

    with oip.OipClient(service, grpc_url=grpc_url) as ai:
        try:
            with t.phase("oip_metadata"):
                meta = ai.model_metadata(model)
        except oip.ModelNotReady as exc:
            raise StepError(str(exc)) from None
        limits = _model_parameters(meta, model, device_setting)
        _check_labels(limits, model)
        modality = str(limits.get("modality", "CT"))
        max_slices = int(limits["max_slices"]) if "max_slices" in limits else None
        min_slices = int(limits.get("min_slices", 1))
        algorithm = results.Algorithm(str(limits.get("algorithm_name", model)),
                                      str(limits.get("algorithm_version") or (meta.get("versions") or ["unknown"])[0]))

        with t.phase("qido"):
            series_uid = _choose_series(dicomweb, study_uid, modality, max_slices)
        with t.phase("wado"):
            datasets = transfer.retrieve_series(dicomweb, study_uid, series_uid)
        try:
            with t.phase("volume"):
                volume = build_volume(pick_series(datasets, modality, series_uid), min_slices, max_slices)
        except VolumeError as exc:
            raise StepError(str(exc)) from None
        ctx.log.info("infer %s: %d slices to model %s", ctx.business_key, volume.hu.shape[0], model)

        uids = results.result_uids(volume.series_uid, algorithm)
        # The SEG's header depends on the source images only, the SR's on them and the SEG's header: make
        # them (and encode the SEG's) while the model runs, starting once the volume is sent (their GIL-heavy
        # start would otherwise hold up the sending); the answer then only fills in the mask and the volumes.
        background = ThreadPoolExecutor(1, thread_name_prefix="infer-seg")
        prepared: list[Future] = []

        def prepare_report(seg: Future) -> results.PreparedReport | None:
            made = seg.result()
            if not isinstance(made, results.PreparedSegmentation):
                return None   # a SEG made whole from the mask: the SR after it
            return t.background("sr_prepare", results.prepare_measurement_report, volume.datasets, made.seg,
                                algorithm, uids)

        def prepare() -> None:
            if not prepared:
                prepared.append(background.submit(t.background, "seg_prepare", results.prepare_segmentation,
                                                  volume.datasets, algorithm, uids))
                prepared.append(background.submit(prepare_report, prepared[0]))
        try:
            oip_times: dict[str, float] = {}
            busy_until = time.monotonic() + timeout
            while True:
                try:
                    answer = ai.infer(model, {"HU": volume.hu, "SPACING_MM": np.array(volume.spacing_mm, np.float32)},
                                      request_id=ctx.business_key, timings=oip_times, on_sent=prepare)
                    break
                except (oip.TensorMismatch, oip.InferenceRejected) as exc:
                    raise StepError(str(exc)) from None
                except oip.ServiceBusy as exc:
                    # the service's own limit on requests at once: wait for room (up to ai_timeout_s),
                    # as the answer asks, rather than fail the study; then the runtime's retries
                    wait = min(max(exc.retry_after, 0.5), BUSY_WAIT_MAX_S)
                    if time.monotonic() + wait > busy_until:
                        raise
                    ctx.log.info("infer %s: the AI service is busy; asking again in %.1f s", ctx.business_key, wait)
                    t.seconds["busy_wait"] = t.seconds.get("busy_wait", 0.0) + wait
                    time.sleep(wait)
            # ModelNotReady, InferenceTimeout, ServiceUnavailable: transient, the runtime retries
            for name, seconds in oip_times.items():
                t.seconds[f"oip_{name}"] = seconds
            model_ms = answer.parameters.get("model_time_ms")
            if isinstance(model_ms, (int, float)):
                t.seconds["model"] = float(model_ms) / 1000

            labels = answer.outputs["LUNG_LABELS"]
            if labels.shape != volume.hu.shape:
                raise StepError(f"model '{model}' answered a mask of shape {list(labels.shape)} for a volume of "
                                f"{list(volume.hu.shape)}")
            volumes_ml = tuple(float(v) for v in answer.outputs["LUNG_VOLUME_ML"][:2])
            with t.phase("seg"):
                prepare()  # (a server that answered before reading the whole request)
                seg, seg_bytes = prepared[0].result().fill(labels)
            with t.phase("sr"):
                report = prepared[1].result()
                if report is not None:
                    sr, sr_bytes = report.fill(volumes_ml)
                else:
                    sr = results.build_measurement_report(volume.datasets, seg, volumes_ml, algorithm, uids)
                    sr_bytes = results.to_part10(sr)
        finally:
            background.shutdown(wait=False, cancel_futures=True)

    with t.phase("stow"):
        transfer.store_instances(dicomweb, [seg_bytes, sr_bytes])
    ctx.log.info("infer %s: stored SEG and SR (%s %s)", ctx.business_key, algorithm.name, algorithm.version)
    t.finish()
    return ctx.wanted({
        "result-location": f"{gateway}/studies/{study_uid}",
        "result-study-instance-uid": study_uid,
        "result-series-uids": f"{uids.seg_series},{uids.sr_series}",
        "status": "completed",
    }), t
