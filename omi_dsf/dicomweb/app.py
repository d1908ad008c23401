"""The ASGI application: one handler per DICOMweb transaction, for each backend.

Routes exist at the root (the default backend) and under ``/aets/{aet}`` (any backend).
Blocking backend calls run in worker threads; retrieval streams through :class:`ThreadStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from io import BytesIO
from typing import AsyncIterator

import anyio
from pydicom import dcmread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from omi_dsf.serving.limits import limit_error_handler

from . import dicomxml, part10, qido, rendering, stowjson, transcode, wado
from .attributes import INSTANCE, MODALITY, SERIES, SOP_UID, STUDY, name_of
from .auth import AuthMiddleware
from .backends import build_backends
from .backends.dimse import DimseBackend
from .config import GatewayConfig
from .dicomjson import dumps
from .errors import (BadRequest, DicomwebError, NotAcceptable, NotFound, PacsUnavailable, PayloadTooLarge,
                     UnsupportedMediaType)
from .guard import error_response, limited, redact
from .logs import quiet_pydicom
from .multipart import (CRLF, MultipartReader, Part, closing, content_type, new_boundary, parse_accept,
                        parse_media_type, part_head)
from .query import check_uid, is_uid, parse_qido
from .stream import ThreadStream

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xA900  # the instance does not belong to the study in the URL
OUT_OF_RESOURCES = part10.OUT_OF_RESOURCES   # a limit (max_instance_mb)
# series of these modalities hold no images: a study's thumbnail comes from another series
NO_IMAGES = {"SR", "KO", "PR", "DOC", "RTPLAN", "RTSTRUCT", "RTRECORD", "ECG", "HD", "AU", "REG", "FID"}
STOW_BATCH_BYTES, STOW_BATCH_PARTS = 8 << 20, 32   # stored while the rest of a STOW body arrives



async def multipart_body(stream, first: bytes, boundary: str) -> AsyncIterator[bytes]:
    """A multipart body from a retrieval's parts, each starting with CRLF and its delimiter: the
    first without that CRLF, the others as they come (empty ones, instances left out, skipped), the
    closing delimiter; the retrieval cancelled however the body ends (a client gone included)."""
    try:
        yield first[2:]
        async for data in stream:
            if data:
                yield data
        yield CRLF + closing(boundary)
    finally:
        stream.cancel()

class Stats:
    """Counters for tests and benchmarks (no patient data)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.times: dict[str, float] = {}   # time.monotonic() of the latest such event

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def mark(self, name: str) -> None:
        self.times[name] = time.monotonic()

    def get(self, name: str) -> int:
        return self.counts.get(name, 0)


class Gateway:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.backends, self._close = build_backends(cfg)
        self.limiter = anyio.CapacityLimiter(32)
        self.stats = Stats()
        # one of several worker processes (serve() set the shared folder): the cores are shared too
        workers = cfg.worker_count if cfg._shared is not None else 1
        self.transcoder = transcode.Pool(None if workers == 1 else transcode.pool_size() // workers)

    def close(self) -> None:
        self.transcoder.close()
        self._close()

    # -- helpers -------------------------------------------------------------------------------
    def backend(self, request: Request):
        aet = request.path_params.get("aet")
        if aet is None:
            return self.backends[self.cfg.default_backend]
        backend = self.backends.get(aet)
        if backend is None:
            raise NotFound(f"no PACS or store named {aet[:20]!r} on this gateway")
        return backend

    def base_url(self, request: Request) -> str:
        if self.cfg.base_url:
            base = self.cfg.base_url.rstrip("/")
        else:  # scheme and Host of the request; configure base_url behind a reverse proxy
            server = request.scope.get("server")
            host = request.headers.get("host") or (f"{server[0]}:{server[1]}" if server else "localhost")
            # Some clients (dicomweb-client's STOW) send a Host header without the port.
            if server and ":" not in host.rsplit("]", 1)[-1] and server[1] not in (80, 443):
                host = f"{host}:{server[1]}"
            base = f"{request.url.scheme}://{host}"
        aet = request.path_params.get("aet")
        return f"{base}/aets/{aet}" if aet else base

    def stall_timeout(self, backend) -> float:
        if isinstance(backend, DimseBackend):
            return backend.cfg.dimse_timeout + 10
        return 60.0

    async def run(self, fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    @staticmethod
    def accept(request: Request):
        """The media types the client takes: the ``accept`` query parameter (PS3.18 8.3.3.1, for
        clients that cannot set headers, such as an <img> tag) before the Accept header."""
        return parse_accept(request.query_params.get("accept") or request.headers.get("accept"))

    @staticmethod
    def scope(request: Request) -> dict[str, str]:
        p = request.path_params
        out = {}
        for level, key, what in ((STUDY, "study", "StudyInstanceUID"), (SERIES, "series", "SeriesInstanceUID"),
                                 (INSTANCE, "instance", "SOPInstanceUID")):
            if key in p:
                out[level] = check_uid(p[key], f"{what} in the URL:")
        return out

    async def open_stream(self, backend, level: str, scope: dict, transform=None,
                          head=None) -> tuple[ThreadStream, object]:
        """Start the retrieval and wait for its first item (errors before it become HTTP errors).
        ``head``: see the backends' ``retrieve``; not together with ``transform``."""
        stats = self.stats

        def produce(emit, token):
            failed: list[DicomwebError] = []

            def out(data):
                stats.add("instances_received")
                stats.mark("instance_received")
                if transform is None:
                    emit(data)
                    return
                try:
                    item = transform(data)
                except DicomwebError as exc:   # the client's error (406 …), not the source's:
                    failed.append(exc)          # stop, and say so whatever the backend makes of it
                    token.cancel()
                    raise
                emit(item)
            stats.add("streams_active")
            try:
                backend.retrieve(level, scope, out, token, head)
            except Exception:
                if failed:
                    raise failed[0] from None
                raise
            finally:
                stats.add("streams_active", -1)
            if failed:
                raise failed[0]
        stream = ThreadStream(produce, maxsize=self.cfg.stream_queue,
                              stall_timeout=self.stall_timeout(backend)).start()
        try:
            first = await stream.next()
        except StopAsyncIteration:
            raise NotFound(f"no instances for this {level}") from None
        except BaseException:
            stream.cancel()
            raise
        return stream, first

    # -- QIDO-RS -------------------------------------------------------------------------------
    async def search(self, request: Request, level: str) -> Response:
        scope = self.scope(request)
        q = parse_qido(list(request.query_params.multi_items()), level,
                       scope.get(STUDY), scope.get(SERIES))
        as_xml = self._wants_xml(self.accept(request), "search results")
        backend = self.backend(request)
        result = await self.run(qido.search, backend, q, self.base_url(request), self.cfg.max_results,
                                self.cfg.limits.query_timeout)
        warnings = []
        if q.ignored:   # PS3.18 8.3: unsupported parameters are ignored; say which
            names = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in ", ".join(q.ignored[:10]))
            warnings.append(f'299 omi-gateway "Unsupported query parameters ignored: {names}"')
        if result.unmatched:   # keys the PACS ignored that the gateway could not check either
            names = ", ".join(sorted(name_of(t) for t in result.unmatched))
            warnings.append(f'299 omi-gateway "The PACS did not match on {names}; the gateway could not '
                            'check them: the results may include non-matching ones"')
        if result.unfilled:   # return keys the PACS left out that the gateway could not fill either
            names = ", ".join(sorted(name_of(t) for t in result.unfilled))
            warnings.append(f'299 omi-gateway "The PACS did not return {names}; the gateway could not fill '
                            'them in for every match"')
        if result.truncated:
            warnings.append('299 omi-gateway "There are additional results that can be requested"')
        if hasattr(backend, "incomplete"):
            studies = {q.study_uid} if q.study_uid else {
                str(item.get("0020000D", {}).get("Value", [""])[0]) for item in result.items}
            broken = await self.run(backend.incomplete, studies)
            warnings += [f'299 omi-gateway "Incomplete upload: study {uid}: '
                         f'{why.encode("ascii", "replace").decode()}; the instances that are stored are listed"'
                         for uid, why in sorted(broken.items())[:20]]
        headers = {"Warning": ", ".join(warnings)} if warnings else {}
        if as_xml:   # one Native DICOM Model document per match
            boundary = new_boundary()
            body = b"".join(part_head(boundary, DICOM_XML) + dicomxml.to_xml(item) + CRLF for item in result.items)
            return Response(body + closing(boundary), media_type=content_type(boundary, DICOM_XML), headers=headers)
        return Response(dumps(result.items), media_type=DICOM_JSON, headers=headers)

    @staticmethod
    def _wants_xml(accept, what: str) -> bool:
        """DICOM JSON (False) or multipart/related of Native DICOM Model XML (True), whichever
        the client names first; NotAcceptable when it names neither."""
        for mt in accept:
            if mt.mime in (DICOM_JSON, "application/json", "*/*", "application/*"):
                return False
            if mt.mime == "multipart/related" and mt.type_param == DICOM_XML:
                return True
        raise NotAcceptable(f'Accept: {what} are available as {DICOM_JSON} and as '
                            f'multipart/related; type="{DICOM_XML}"')

    # -- WADO-RS: instances --------------------------------------------------------------------
    async def retrieve(self, request: Request, level: str) -> Response:
        scope = self.scope(request)
        accept = self.accept(request)
        if wado.wants_bulk(accept):
            return await self.retrieve_bulk(request, level, scope)
        choice = wado.choose_instance_media(accept)
        backend = self.backend(request)
        boundary = new_boundary()
        head = part_head(boundary, wado.DICOM)
        if choice.as_stored:
            # The backend puts each part's header in front of its instance, in the buffer it
            # fills anyway: one write per instance, no copy here.
            heads = iter([head])  # the first part has no CRLF before its delimiter

            def next_head() -> bytes:
                return next(heads, CRLF + head)
            stream, first = await self.open_stream(backend, level, scope, head=next_head)
            separator = b""
        else:   # converted by the transcoder's workers, several at a time, sent in order
            stream, pending = await self.open_stream(backend, level, scope,
                                                     lambda data: self.transcoder.submit(data, choice.wanted))
            try:
                first = b"".join(await self._converted(pending, boundary))
            except BaseException:
                stream.cancel()
                raise
            separator = CRLF

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            try:
                yield first
                self.stats.mark("first_part_sent")
                sent = 1
                async for data in stream:
                    if separator:   # transcoded: the part's head, then the instance (no copy)
                        head_, data = await self._converted(data, boundary)
                        yield separator + head_
                    yield data
                    sent += 1
                yield CRLF + closing(boundary)
            except DicomwebError as exc:
                log.warning("retrieval of a %s ended after %d instances: %s", level, sent, exc.message)
                raise
            finally:
                stream.cancel()

        single = choice.wanted[0] if len(choice.wanted) == 1 and not choice.as_stored else None
        ct = content_type(boundary, wado.DICOM, single)
        return StreamingResponse(body(), media_type=ct)

    async def _converted(self, pending, boundary: str) -> tuple[bytes, bytes]:
        """One transcoded instance: its part head (naming the syntax it is in) and its bytes."""
        data, ts = self.transcoder.result(await asyncio.wrap_future(pending))
        return part_head(boundary, wado.DICOM, transfer_syntax=ts), data

    async def retrieve_bulk(self, request: Request, level: str, scope: dict) -> Response:
        """Every instance's bulk data (Pixel Data and other binary values) at a study, series or
        instance URL, one part each, named by its BulkDataURI in Content-Location (PS3.18 10.4.1.1.2)."""
        backend = self.backend(request)
        base = self.base_url(request)
        boundary = new_boundary()

        def to_parts(data: bytes) -> bytes:
            ds = wado.read(data)
            uri = (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                   f"/instances/{ds.SOPInstanceUID}/bulk")
            chunks = []
            for tag, value, ts in wado.bulk_values(ds):
                chunks += [CRLF, part_head(boundary, wado.OCTET, f"{uri}/{tag:08X}", ts), value]
            return b"".join(chunks)

        stream, first = await self.open_stream(backend, level, scope, to_parts)
        return StreamingResponse(multipart_body(stream, first, boundary), media_type=content_type(boundary, wado.OCTET))

    async def retrieve_metadata(self, request: Request, level: str) -> Response:
        scope = self.scope(request)
        as_xml = self._wants_xml(self.accept(request), "metadata")
        backend = self.backend(request)
        base = self.base_url(request)
        boundary = new_boundary()

        def render(ds) -> bytes:
            """One instance's metadata: its DICOM JSON object, or its Native DICOM Model document."""
            uri = (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                   f"/instances/{ds.SOPInstanceUID}/bulk")
            obj = wado.to_json(ds, uri)
            return dicomxml.to_xml(obj) if as_xml else dumps(obj)

        def to_meta(data: bytes) -> bytes:
            doc = render(wado.read(data))
            return CRLF + part_head(boundary, DICOM_XML) + doc if as_xml else doc

        held = getattr(backend, "metadata", None)
        if held is not None:   # a PACS: the headers it already holds, fetched without pixel data
            docs = await self.run(held, level, scope, (base, as_xml), render)
            if as_xml:
                body = b"".join(CRLF + part_head(boundary, DICOM_XML) + d for d in docs)[2:]
                return Response(body + CRLF + closing(boundary), media_type=content_type(boundary, DICOM_XML))
            return Response(b"[" + b",".join(docs) + b"]", media_type=DICOM_JSON)

        if as_xml:
            stream, first = await self.open_stream(backend, level, scope, to_meta)
            return StreamingResponse(multipart_body(stream, first, boundary),
                                     media_type=content_type(boundary, DICOM_XML))

        stream, first = await self.open_stream(backend, level, scope, to_meta)

        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"[" + first
                async for item in stream:
                    yield b"," + item
                yield b"]"
            finally:
                stream.cancel()

        return StreamingResponse(body(), media_type=DICOM_JSON)

    # -- WADO-RS: parts of one instance --------------------------------------------------------
    async def _instance(self, request: Request):
        scope = self.scope(request)
        backend = self.backend(request)
        data = await self.run(backend.instance, scope[STUDY], scope[SERIES], scope[INSTANCE])
        try:
            return await self.run(wado.read, data)
        except Exception as exc:  # noqa: BLE001 - the source holds an instance pydicom cannot read
            raise PacsUnavailable(f"the instance from {backend.name} cannot be read ({type(exc).__name__})") from None

    async def retrieve_frames(self, request: Request) -> Response:
        numbers = wado.parse_frame_list(request.path_params["frames"], self.cfg.limits.max_frames)
        accept = self.accept(request)
        ds = await self._instance(request)
        frames, ts = wado.frame_bytes(ds, numbers)
        part, ts, single, decode = wado.choose_frame_media(accept, ts)
        if decode:
            frames = await self.run(transcode.native_frames, ds, numbers)
        if single:
            if len(frames) != 1:
                raise NotAcceptable("Accept: several frames need multipart/related")
            return Response(frames[0], media_type=part, headers={"Content-Type": f"{part}; transfer-syntax={ts}"})
        return self._multipart(frames, part, ts)

    def _multipart(self, values: list[bytes], part: str, ts: str | None) -> Response:
        boundary = new_boundary()
        chunks = []
        for value in values:
            chunks += [part_head(boundary, part, transfer_syntax=ts), value, CRLF]
        chunks.append(closing(boundary))
        return Response(b"".join(chunks), media_type=content_type(boundary, part, ts))

    async def retrieve_bulkdata(self, request: Request) -> Response:
        accept = self.accept(request)
        ds = await self._instance(request)
        value = wado.bulk_value(ds, request.path_params["tag"])
        for mt in accept:
            if mt.mime == wado.OCTET:
                return Response(value, media_type=wado.OCTET)
            if mt.mime in ("*/*", "multipart/related", "multipart/*"):
                return self._multipart([value], wado.OCTET, None)
        raise NotAcceptable("Accept: bulk data is available as application/octet-stream")

    async def retrieve_rendered_many(self, request: Request, level: str) -> Response:
        """A rendered study or series (PS3.18 Table 10.3-2): with ``Accept: multipart/related;
        type="image/…"`` every instance with pixel data rendered (its first frame), one part each
        named by its rendered URL; otherwise one image, the middle instance of the (first) series."""
        accept = self.accept(request)
        media = rendering.choose_multipart_image_media(accept)
        if media is None:
            return await self.retrieve_rendered(request)
        opts = rendering.parse_render_params(list(request.query_params.multi_items()), False)
        scope = self.scope(request)
        backend = self.backend(request)
        base = self.base_url(request)
        boundary = new_boundary()
        max_bytes = self.cfg.limits.max_instance

        def to_part(data: bytes) -> bytes:
            ds = wado.read(data)
            if "PixelData" not in ds:
                return b""
            try:
                image = rendering.render(ds, 1, media, opts, max_bytes)
            except DicomwebError as exc:   # one instance the gateway cannot render: left out
                log.info("rendered %s: an instance left out: %s", level, exc.message)
                return b""
            where = (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                     f"/instances/{ds.SOPInstanceUID}/rendered")
            return CRLF + part_head(boundary, media, where) + image

        stream, first = await self.open_stream(backend, level, scope, to_part)
        try:
            while not first:
                first = await stream.next()
        except StopAsyncIteration:
            stream.cancel()
            raise NotFound(f"nothing to render in this {level}") from None

        return StreamingResponse(multipart_body(stream, first, boundary), media_type=content_type(boundary, media))

    async def retrieve_rendered(self, request: Request, thumbnail: bool = False) -> Response:
        accept = self.accept(request)
        multipart_media = rendering.choose_multipart_image_media(accept)
        wrapped = multipart_media is not None
        media = multipart_media or rendering.choose_image_media(accept)
        opts = rendering.parse_render_params(list(request.query_params.multi_items()), thumbnail)
        frame = 1
        if "frames" in request.path_params:
            frames = wado.parse_frame_list(request.path_params["frames"], self.cfg.limits.max_frames)
            if len(frames) != 1:
                raise BadRequest("frames: a rendered frame takes exactly one frame number")
            frame = frames[0]
        if "instance" not in request.path_params:
            request.path_params["instance"] = await self._representative(request)
        ds = await self._instance(request)
        image = await self.run(rendering.render, ds, frame, media, opts, self.cfg.limits.max_instance)
        if wrapped:   # the client asked for multipart/related: one part
            return self._multipart([image], media, None)
        return Response(image, media_type=media)

    async def _representative(self, request: Request) -> str:
        """The middle instance of the (first) series: what a study/series thumbnail shows."""
        scope = self.scope(request)
        backend = self.backend(request)
        if SERIES not in scope:
            found = await self.run(backend.find, SERIES, {}, {MODALITY}, {STUDY: scope[STUDY]})
            if not found:
                raise NotFound("no series in this study")
            images = [se for se in found if str(se.get("Modality", "")) not in NO_IMAGES]
            request.path_params["series"] = str((images or found)[0].SeriesInstanceUID)
            scope[SERIES] = request.path_params["series"]
        found = await self.run(backend.find, INSTANCE, {}, {0x00200013}, scope)
        if not found:
            raise NotFound("no instances in this series")
        found.sort(key=lambda d: int(d.get("InstanceNumber", 0) or 0))
        return str(found[len(found) // 2][SOP_UID].value)

    # -- STOW-RS -------------------------------------------------------------------------------
    async def store(self, request: Request) -> Response:
        scope = self.scope(request)
        lim = self.cfg.limits
        ctype = parse_media_type(request.headers.get("content-type", ""))
        if ctype.mime != "multipart/related" or (ctype.type_param not in (None, wado.DICOM, DICOM_JSON)):
            raise UnsupportedMediaType('Content-Type: STOW-RS takes multipart/related; type="application/dicom" '
                                       f'or type="{DICOM_JSON}" (metadata and bulk data)')
        as_json = ctype.type_param == DICOM_JSON   # parts held until the body is whole, then built
        limit, part_limit = lim.max_body, lim.max_instance
        too_large = f"request body larger than limits.max_body_mb ({lim.max_body_mb:g} MB)"
        part_too_large = f"a part larger than limits.max_instance_mb ({lim.max_instance_mb} MB)"
        length = request.headers.get("content-length")
        if length and length.isascii() and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(too_large)
        reader = MultipartReader(ctype.params.get("boundary", ""), max_parts=lim.max_parts,
                                 parts_limit="limits.max_parts")
        backend = self.backend(request)
        base = self.base_url(request)
        url_study = scope.get(STUDY)
        # Parts are stored in batches while the rest of the body still arrives (one batch at a
        # time, in order), so receiving and storing overlap and memory stays at about a batch.
        stored: list = []
        failed: list = []
        batch: list = []
        batch_bytes = received = 0
        in_flight: asyncio.Future | None = None

        async def settle() -> None:
            nonlocal in_flight
            if in_flight is not None:
                done, in_flight = in_flight, None
                s_, f_ = await done
                stored.extend(s_)
                failed.extend(f_)

        async def broke_off(why: str) -> None:
            """Store what was complete; note the studies it touched as incomplete."""
            await settle()
            studies = {s[2] for s in stored}
            if studies and hasattr(backend, "note_upload"):
                await self.run(backend.note_upload, studies, why)

        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(too_large)
                for part in reader.feed(chunk):
                    if len(part.body) > part_limit:
                        raise PayloadTooLarge(part_too_large)
                    batch.append(part)
                    batch_bytes += len(part.body)
                    if as_json:
                        continue
                    if batch_bytes >= STOW_BATCH_BYTES or len(batch) >= STOW_BATCH_PARTS:
                        await settle()
                        in_flight = asyncio.ensure_future(self.run(self._store_parts, backend, batch, url_study,
                                                                   part_limit))
                        batch, batch_bytes = [], 0
                if reader.buffered > part_limit + 1024:   # one part is held whole: not past the limit
                    raise PayloadTooLarge(part_too_large)
            reader.close()
            if not reader.count:
                raise BadRequest("multipart body: no parts")
            if as_json:
                files, unbuilt = await self.run(stowjson.to_part10, batch)
                failed.extend(unbuilt)
                batch = [Part({"content-type": wado.DICOM}, data) for data in files]
        except ClientDisconnect:
            await broke_off(f"the client went away after {len(stored)} instances")
            log.info("STOW-RS: the client went away; %d instances stored, the study is noted incomplete",
                     len(stored))
            return Response(status_code=400)   # nobody reads it
        except HTTPException as exc:   # a shared limit while reading (body_timeout, max_body_mb)
            await broke_off(str(exc.detail).replace('"', "'"))
            raise
        except DicomwebError as exc:
            await broke_off(exc.message.replace('"', "'"))
            if stored:   # say which: those instances are kept (a STOW of them again replaces them)
                exc.message = f"{exc.message}; the {len(stored)} instances before it were stored"
                exc.extra["stored"] = [s[1] for s in stored]
            raise
        except BaseException:
            await settle()   # cancelled: finish the batch being stored, then give up
            raise
        await settle()
        if batch:
            s_, f_ = await self.run(self._store_parts, backend, batch, url_study, part_limit)
            stored.extend(s_)
            failed.extend(f_)
        if hasattr(backend, "note_upload"):   # the body arrived whole: the studies are as sent
            await self.run(backend.note_upload, {s[2] for s in stored}, None)
        return self._stow_response((stored, failed), base, url_study)

    @staticmethod
    def _store_parts(backend, parts, url_study, max_instance: int):
        """Check and parse each part, store those that are fit (runs in a worker thread)."""
        failed, items, meta, headers = [], [], [], []
        for part in parts:
            ptype = parse_media_type(part.content_type).mime if part.content_type else wado.DICOM
            if ptype != wado.DICOM:
                failed.append(("", "", CANNOT_UNDERSTAND, f"part media type {ptype[:40]} is not application/dicom"))
                continue
            try:   # the whole file, before pydicom sees it: cut off, deflate bomb, nesting, VRs
                file_meta = part10.check(part.body, max_instance)
            except part10.Refused as exc:
                known = exc.meta if exc.meta and is_uid(exc.meta.sop_instance) and is_uid(exc.meta.sop_class) else None
                failed.append((known.sop_class if known else "", known.sop_instance if known else "",
                               exc.status, exc.reason + (" (limits.max_instance_mb)" if exc.status == OUT_OF_RESOURCES else "")))
                continue
            try:
                ds = dcmread(BytesIO(part.body), stop_before_pixels=True)
                uids = {k: str(ds.get(k, "")) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                                         "SeriesInstanceUID")}
            except Exception as exc:  # noqa: BLE001 - whatever pydicom makes of untrusted bytes
                failed.append(("", "", CANNOT_UNDERSTAND, f"not a DICOM Part 10 instance ({type(exc).__name__})"))
                continue
            bad = next((k for k, v in uids.items() if not is_uid(v)), None)
            sop_class, sop, study = uids["SOPClassUID"], uids["SOPInstanceUID"], uids["StudyInstanceUID"]
            if bad:
                failed.append((sop_class if is_uid(sop_class) else "", sop if is_uid(sop) else "",
                               CANNOT_UNDERSTAND, f"{bad} missing or invalid"))
                continue
            if url_study and study != url_study:
                failed.append((sop_class, sop, STUDY_MISMATCH, "StudyInstanceUID does not match the URL"))
                continue
            items.append((sop_class, sop, file_meta.transfer_syntax, part.body))
            headers.append(ds)
            meta.append((sop_class, sop, study, uids["SeriesInstanceUID"]))
        stored = []
        if items:
            results = backend.store(items, {m[2] for m in meta}, headers)
            for (sop_class, sop, study, series), (status, comment) in zip(meta, results):
                if status == 0x0000 or status >> 12 == 0xB:
                    stored.append((sop_class, sop, study, series, status, comment))
                else:
                    failed.append((sop_class, sop, status, comment))
        return stored, failed

    @staticmethod
    def _stow_response(outcome, base: str, url_study: str | None) -> Response:
        stored, failed = outcome
        body: dict = {}
        studies = {s[2] for s in stored} | ({url_study} if url_study else set())
        # Type 2 (PS3.18 Table I.1-1: the URL of "the Study"): empty when instances of several
        # studies (or none) were stored, each instance's own RetrieveURL names its study
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{next(iter(studies))}"]} if len(studies) == 1 \
            else {"vr": "UR"}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": [{
                "00081150": {"vr": "UI", "Value": [c]} if c else {"vr": "UI"},
                "00081155": {"vr": "UI", "Value": [i]} if i else {"vr": "UI"},
                "00081197": {"vr": "US", "Value": [status]},
                **({"00000902": {"vr": "LO", "Value": [why[:64]]}} if why else {}),
            } for c, i, status, why in failed]}
        if stored:
            body["00081199"] = {"vr": "SQ", "Value": [{
                "00081150": {"vr": "UI", "Value": [c]},
                "00081155": {"vr": "UI", "Value": [i]},
                "00081190": {"vr": "UR", "Value": [f"{base}/studies/{st}/series/{se}/instances/{i}"]},
                **({"00081196": {"vr": "US", "Value": [status]}} if status else {}),
            } for c, i, st, se, status, _ in stored]}
        warnings = any(s[4] for s in stored)
        if stored:
            status = 202 if failed or warnings else 200
        else:   # nothing stored: 413 when only limits stood in the way
            status = 413 if failed and all(f[2] == OUT_OF_RESOURCES for f in failed) else 409
        return Response(dumps(body), status_code=status, media_type=DICOM_JSON)


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def _handler(fn):
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except DicomwebError as exc:
            if exc.status >= 500:   # the path without its UIDs (patient data stays out of logs)
                log.warning("%s %s: %s", request.method, redact(request.url.path), exc.message)
            return JSONResponse({"status": exc.status, "error": exc.message, **exc.extra}, status_code=exc.status)
    return endpoint


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug: 500 in JSON naming the log line (written by guard.ExceptionLog, without the message)."""
    where = redact(request.url.path).rsplit("[", 1)[-1].rstrip("]")
    return JSONResponse({"status": 500, "error": f"internal error ({type(exc).__name__}); logged as {where}"},
                        status_code=500)


def create_app(cfg: GatewayConfig) -> Starlette:
    gw = Gateway(cfg)

    def routes() -> list[Route]:
        S = "/studies/{study}"
        SE = S + "/series/{series}"
        I = SE + "/instances/{instance}"
        r = []

        def add(path, fn, methods=("GET",)):
            r.append(Route(path, _handler(fn), methods=list(methods)))

        # QIDO-RS
        add("/studies", lambda rq: gw.search(rq, STUDY))
        add("/series", lambda rq: gw.search(rq, SERIES))
        add("/instances", lambda rq: gw.search(rq, INSTANCE))
        add(S + "/series", lambda rq: gw.search(rq, SERIES))
        add(S + "/instances", lambda rq: gw.search(rq, INSTANCE))
        add(SE + "/instances", lambda rq: gw.search(rq, INSTANCE))
        # STOW-RS
        add("/studies", gw.store, ("POST",))
        add(S, gw.store, ("POST",))
        # WADO-RS
        add(S, lambda rq: gw.retrieve(rq, STUDY))
        add(SE, lambda rq: gw.retrieve(rq, SERIES))
        add(I, lambda rq: gw.retrieve(rq, INSTANCE))
        add(S + "/metadata", lambda rq: gw.retrieve_metadata(rq, STUDY))
        add(SE + "/metadata", lambda rq: gw.retrieve_metadata(rq, SERIES))
        add(I + "/metadata", lambda rq: gw.retrieve_metadata(rq, INSTANCE))
        add(I + "/frames/{frames}", gw.retrieve_frames)
        add(I + "/bulk/{tag}", gw.retrieve_bulkdata)
        add(S + "/rendered", lambda rq: gw.retrieve_rendered_many(rq, STUDY))
        add(SE + "/rendered", lambda rq: gw.retrieve_rendered_many(rq, SERIES))
        add(I + "/rendered", gw.retrieve_rendered)
        add(I + "/frames/{frames}/rendered", gw.retrieve_rendered)
        add(S + "/thumbnail", lambda rq: gw.retrieve_rendered(rq, True))
        add(SE + "/thumbnail", lambda rq: gw.retrieve_rendered(rq, True))
        add(I + "/thumbnail", lambda rq: gw.retrieve_rendered(rq, True))
        add(I + "/frames/{frames}/thumbnail", lambda rq: gw.retrieve_rendered(rq, True))
        return r

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(gw.close)

    quiet_pydicom()
    app = Starlette(routes=[Route("/health", _health), *routes(), Mount("/aets/{aet}", routes=routes())],
                    lifespan=lifespan, exception_handlers={Exception: _internal_error,
                                                           HTTPException: limit_error_handler(error_response)})
    app.state.gateway = gw
    wrapped = AuthMiddleware(app, cfg)
    if cfg.cors_origins:  # answers preflight requests, which carry no credentials
        from starlette.middleware.cors import CORSMiddleware
        wrapped = CORSMiddleware(wrapped, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Accept", "Content-Type"],
                                 expose_headers=["Content-Type", "Warning"])
    wrapped = limited(wrapped, cfg.limits)   # outermost: counts and times every request; logs no data
    wrapped.gateway = gw
    return wrapped
