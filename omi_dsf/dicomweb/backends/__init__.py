"""Where the gateway's data lives: a PACS over DIMSE, or the embedded store.

Both offer the same blocking operations (run in worker threads by the web layer):

* ``find(level, match, returns, scope) -> list[Dataset]`` -- one hierarchical query level, the
  upper levels fixed by ``scope`` ({level: uid}); like a Study Root C-FIND;
* ``study_summary(study_uid)`` / ``series_count(study_uid, series_uid)`` -- ModalitiesInStudy and
  the NumberOf… attributes, for answers that lack them;
* ``retrieve(level, scope, emit, token, head=None)`` -- every instance (Part 10 bytes) at or below
  a level, handed to ``emit`` as soon as it arrives, each after ``head()`` (a multipart part
  header) when given; raises NotFound when there is none;
* ``instance(study, series, sop) -> bytes`` -- one instance (cached), for frames/bulk/rendered;
* ``store(items, study_uids, headers=None) -> [(status, comment)]`` -- STOW-RS: ``items`` are
  (study, series, sop, Part 10 bytes); ``headers`` (the parsed headers, when the web layer has them)
  spare the store backend a re-parse.

Each has extras the web layer uses where present: the store backend ``note_upload`` /
``incomplete`` (a STOW-RS body that broke off marks its studies), the DIMSE backend ``metadata``
and ``complete`` (headers it holds fill what the PACS leaves out).
"""

from __future__ import annotations

from ..config import DimseBackendConfig, GatewayConfig, StoreBackendConfig


def build_backends(cfg: GatewayConfig) -> tuple[dict, object]:
    """The configured backends by name, and a function that closes them all."""
    from .dimse import DimseBackend, MoveScpHolder
    from .store import StoreBackend

    move = MoveScpHolder(cfg)
    out = {}
    for name, b in cfg.backends.items():
        if isinstance(b, StoreBackendConfig):
            out[name] = StoreBackend(b)
        elif isinstance(b, DimseBackendConfig):
            out[name] = DimseBackend(b, cfg.calling_aet, move, cfg._shared)

    def close() -> None:
        for backend in out.values():
            backend.close()
        move.stop()

    return out, close
