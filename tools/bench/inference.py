"""Benchmark: per-slice inference time of the reference AI service through the OIP v2 client.

Three ways to run "lung-seg" on the same 512×512 phantom volume:
  direct  -- the model called in this process (baseline: no protocol, no copies over HTTP)
  binary  -- OipClient → HTTP → service, tensors by the binary tensor data extension
  json    -- the same with tensors as JSON lists
The service runs as its own process (`python -m omi_dsf ai-service`) on 127.0.0.1.
Each figure is the median of --repeats runs. The last line of output is one JSON object.

Targets (set before measuring, from what the protocol should cost):
  binary/json    <= 0.5   the binary extension at least halves the time of JSON tensors
  binary/direct  <= 1.5   protocol + HTTP add at most half the model's own time
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from omi_dsf.inference import lungseg, phantom
from omi_dsf.inference.launch import AiServiceProcess  # noqa: E402
from omi_dsf.inference.client import OipClient
from omi_dsf.inference.service import LungSegModel

TARGETS = {"binary_over_json_max": 0.5, "binary_over_direct_max": 1.5}


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    hu = phantom.phantom_hu(args.slices, 0, args.size, args.size)
    truth = phantom.known_lung_mask(args.slices, 0, args.size, args.size)
    spacing = np.array([2.5, 0.7 * 512 / args.size, 0.7 * 512 / args.size], np.float32)
    inputs = {"HU": hu, "SPACING_MM": spacing}
    model = LungSegModel()

    try:
        service = AiServiceProcess(timeout=60).start()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        with OipClient(service.url, timeout=120) as ai:
            results = {}
            for name, binary in (("binary", True), ("json", False)):
                out = ai.infer("lung-seg", inputs, binary=binary)  # warm-up, and a correctness check
                results[name] = lungseg.dice(out.outputs["LUNG_LABELS"] > 0, truth)
            direct_s = _median_seconds(lambda: model.infer(inputs), args.repeats)
            binary_s = _median_seconds(lambda: ai.infer("lung-seg", inputs, binary=True), args.repeats)
            json_s = _median_seconds(lambda: ai.infer("lung-seg", inputs, binary=False), args.repeats)
    finally:
        service.stop()

    n = args.slices
    figures = {
        "benchmark": "inference",
        "volume": [n, args.size, args.size],
        "repeats": args.repeats,
        "per_slice_ms": {"direct": round(direct_s / n * 1000, 2), "binary": round(binary_s / n * 1000, 2),
                         "json": round(json_s / n * 1000, 2)},
        "binary_over_json": round(binary_s / json_s, 3),
        "binary_over_direct": round(binary_s / direct_s, 3),
        "json_over_direct": round(json_s / direct_s, 3),
        "dice": {k: round(v, 4) for k, v in results.items()},
        "targets": TARGETS,
    }
    figures["met"] = (figures["binary_over_json"] <= TARGETS["binary_over_json_max"]
                      and figures["binary_over_direct"] <= TARGETS["binary_over_direct_max"]
                      and min(results.values()) > 0.9)
    print(f"per slice: direct {figures['per_slice_ms']['direct']} ms, binary {figures['per_slice_ms']['binary']} ms,"
          f" JSON {figures['per_slice_ms']['json']} ms")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
