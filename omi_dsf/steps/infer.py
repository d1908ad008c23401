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
MLServer), ai_timeout_s, study_arrival_timeout_s.

What the step needs beyond the protocol (modality, slice limits, label meaning, algorithm name and
version) comes from the model metadata's "parameters" (the reference service, MLServer), else from
the Device (`omi_dsf/registry/device.py`). Tensors travel as raw bytes over gRPC when `grpc_url` is
given, else binary where the server's HTTP has the extension (`OipClient.binary_tensors`), else JSON.

The step starts while the requester's send step is still storing the study at the gateway: it asks
the gateway what has arrived (series-level QIDO-RS every ARRIVAL_POLL_S, backing off to
ARRIVAL_POLL_MAX_S while nothing changes), reads each new instance of the series of the model's
modality by WADO-RS as it appears (READERS at a time, parsed as they come), and knows the study is
complete when its manifest (omi_dsf.transfer.manifest, stored last by the send step) is there and
every instance it lists of the series chosen has been read. The series is chosen by the manifest (the
largest it lists of the model's modality, its slice limit checked); the manifest's own series is never
image input. A study complete at the start is read as one series retrieve. A study that goes
study_arrival_timeout_s without a new instance and is still incomplete (no manifest, or instances the
manifest lists missing) fails the step naming that setting. Timings: "qido" and "wado" for asking and
reading, "arrival" for waiting between asks.

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

from pydicom.dataset import Dataset

from omi_dsf.dicomweb_client import BadAnswer, DicomwebClient, DicomwebRefused
from omi_dsf.inference import client as oip
from omi_dsf.inference.config import AiServiceSettings
from omi_dsf.inference import transfer
from omi_dsf.inference import results
from omi_dsf.inference.volume import VolumeError, build_volume, pick_series, read_instance
from omi_dsf.peer import Peer, PeerConfigError
from omi_dsf.registry import device
from omi_dsf.steps.api import Answers, StepContext, StepError, Timings, text_input
from omi_dsf.steps.settings import StepSettings
from omi_dsf.transfer import manifest

MODALITY_TAG, SERIES_UID_TAG, COUNT_TAG = "00080060", "0020000E", "00201209"
DESCRIPTION_TAG, SOP_UID_TAG = "0008103E", "00080018"
ARRIVAL_POLL_S, ARRIVAL_POLL_MAX_S = 0.2, 0.5   # asking the gateway what arrived: first, then at most
READERS = 4                # WADO-RS retrieves of single instances at once while the study arrives
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


class _Arrival:
    """The study as it arrives at the gateway: the series of the model's modality read instance by
    instance (WADO-RS, READERS at a time) as the gateway lists them, until the manifest is there and
    every instance it lists of the series chosen has been read. A study complete at the start is
    read as one series retrieve."""

    def __init__(self, dicomweb: DicomwebClient, study_uid: str, modality: str, max_slices: int | None,
                 timeout_s: float, t: Timings, check_withdrawn=lambda: None):
        self.web, self.study_uid, self.modality, self.max_slices = dicomweb, study_uid, modality, max_slices
        self.timeout_s, self.t, self.check_withdrawn = timeout_s, t, check_withdrawn
        self.series: dict[str, tuple[str, int, str]] = {}     # series UID -> modality, instance count, description
        self.reads: dict[str, dict[str, Future]] = {}        # series UID -> SOP instance UID -> its dataset
        self.listing: dict[str, dict[str, str]] | None = None   # the manifest's, once read
        self.not_manifests: set[str] = set()                 # KO series whose document is no manifest
        self.read_before_complete = 0
        self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="infer-read")

    def read(self) -> tuple[str, list[Dataset]]:
        """(the series chosen, its instances); StepError when the study cannot be used or did not arrive
        complete within timeout_s of its last new instance."""
        last_change, wait = time.monotonic(), ARRIVAL_POLL_S
        try:
            while True:
                self.check_withdrawn()     # the work item's timeout fired meanwhile: stop waiting
                changed = self._list_series()
                if self.listing is None:
                    self._find_manifest()
                if self.listing is not None:
                    done = self._complete()
                    if done is not None:
                        return done
                else:
                    self._read_arriving()
                now = time.monotonic()
                if changed:
                    last_change, wait = now, ARRIVAL_POLL_S
                elif now - last_change > self.timeout_s:
                    raise StepError(self._not_arrived())
                with self.t.phase("arrival"):
                    time.sleep(wait)
                wait = min(wait * 1.5, ARRIVAL_POLL_MAX_S)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _not_arrived(self) -> str:
        limit = f"{self.timeout_s:g} s (steps.study_arrival_timeout_s)"
        if not self.series:
            return f"study {self.study_uid} is not at the gateway: nothing arrived within {limit}"
        if self.listing is None:
            return (f"the study did not arrive complete within {limit} of its last new instance: "
                    f"{sum(c for _, c, _ in self.series.values())} instances, no manifest")
        return (f"the study did not arrive complete within {limit} of its last new instance: the manifest "
                f"lists instances the gateway does not have")

    def _list_series(self) -> bool:
        """The study's series at the gateway now; whether anything changed since the last look."""
        try:
            with self.t.phase("qido"):
                found = self.web.search_for_series(self.study_uid, fields=[MODALITY_TAG, COUNT_TAG, DESCRIPTION_TAG])
        except DicomwebRefused as exc:
            if exc.status == 400:
                raise StepError(f"the gateway does not know study {self.study_uid} (QIDO: HTTP 400)") from None
            if exc.status != 404:
                raise
            found = []        # not there yet
        seen = {str(_value(s, SERIES_UID_TAG)): (str(_value(s, MODALITY_TAG) or ""), int(_value(s, COUNT_TAG) or 0),
                                                  str(_value(s, DESCRIPTION_TAG) or "")) for s in found}
        changed, self.series = seen != self.series, seen
        return changed

    def _find_manifest(self) -> None:
        for series_uid, (modality, _, description) in self.series.items():
            if series_uid in self.not_manifests or not manifest.is_manifest(modality, description):
                continue
            with self.t.phase("qido"):
                found = self.web.search_for_instances(self.study_uid, series_uid, fields=[SOP_UID_TAG],
                                                      include_defaults=False)
            for item in found:
                with self.t.phase("wado"):
                    data = self.web.retrieve_instance(self.study_uid, series_uid, str(_value(item, SOP_UID_TAG)), "*")
                try:
                    self.listing = manifest.listed(data)
                    return
                except manifest.ManifestError:
                    continue
            if found:
                self.not_manifests.add(series_uid)

    def _fetch(self, series_uid: str, sop_uid: str) -> None:
        self.reads.setdefault(series_uid, {})[sop_uid] = self.pool.submit(
            lambda: read_instance(self.web.retrieve_instance(self.study_uid, series_uid, sop_uid, "*")))

    def _read_arriving(self) -> None:
        """Before the manifest: each new instance of a series of the model's modality (within the slice limit)."""
        for series_uid, (modality, count, _) in self.series.items():
            reading = self.reads.get(series_uid, {})
            if modality != self.modality or count <= len(reading):
                continue
            if self.max_slices is not None and len(reading) >= self.max_slices:
                continue       # too many already: the manifest will tell whether it is the series to use
            # only what is new, where the gateway lists a study's instances in the order they arrived (the
            # OMI gateway's store does); one that does not may leave some out here: they are read once the
            # manifest names them
            with self.t.phase("qido"):
                found = self.web.search_for_instances(self.study_uid, series_uid, fields=[SOP_UID_TAG],
                                                      include_defaults=False, offset=len(reading) or None)
            for item in found:
                sop_uid = str(_value(item, SOP_UID_TAG) or "")
                if sop_uid and sop_uid not in reading:
                    if self.max_slices is not None and len(self.reads.get(series_uid, {})) >= self.max_slices:
                        break
                    self._fetch(series_uid, sop_uid)
                    self.read_before_complete += 1
                    reading = self.reads[series_uid]

    def _chosen(self) -> str | None:
        """The series to use, by the manifest: the largest it lists of the model's modality; None while a
        series it lists is not at the gateway yet (its modality unknown)."""
        listing = self.listing or {}
        if any(uid not in self.series for uid in listing):
            return None
        candidates = [(len(sops), uid) for uid, sops in listing.items() if self.series[uid][0] == self.modality]
        if not candidates:
            modalities = sorted({self.series[uid][0] for uid in listing})
            raise StepError(f"study has no {self.modality} series (modalities found: {', '.join(modalities)}); "
                            f"the model needs {self.modality}")
        count, series_uid = max(candidates)
        if self.max_slices is not None and count > self.max_slices:
            raise StepError(f"series has {count} slices, more than the model's limit of {self.max_slices}")
        return series_uid

    def _complete(self) -> tuple[str, list[Dataset]] | None:
        """With the manifest: the series chosen, read whole, or None while instances it lists are missing."""
        series_uid = self._chosen()
        if series_uid is None:
            return None
        wanted = (self.listing or {})[series_uid]
        reading = self.reads.setdefault(series_uid, {})
        if not reading:      # nothing read yet (the study was complete at the start): one series retrieve
            with self.t.phase("wado"):
                for ds in transfer.retrieve_series(self.web, self.study_uid, series_uid):
                    done: Future = Future()
                    done.set_result(ds)
                    reading[str(ds.SOPInstanceUID)] = done
        for sop_uid in set(wanted) - set(reading):    # named by the manifest: asked for without a listing
            self._fetch(series_uid, sop_uid)
        absent = []
        with self.t.phase("wado"):
            for sop_uid in wanted:
                try:
                    reading[sop_uid].result()
                except DicomwebRefused as exc:
                    if exc.status != 404:
                        raise
                    absent.append(sop_uid)
        if absent:               # listed but not at the gateway yet: asked for again at the next look
            for sop_uid in absent:
                del reading[sop_uid]
            return None
        return series_uid, [reading[sop_uid].result() for sop_uid in wanted]


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

        arrival = _Arrival(dicomweb, study_uid, modality, max_slices, ctx.site.study_arrival_timeout_s, t,
                           ctx.check_withdrawn)
        try:
            series_uid, datasets = arrival.read()
        except BadAnswer as exc:   # truncated or malformed: the runtime retries
            raise transfer.MultipartError(str(exc)) from None
        if arrival.read_before_complete:
            ctx.log.info("infer %s: %d instances read while the study arrived, %d in the series used",
                         ctx.business_key, arrival.read_before_complete, len(datasets))
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
