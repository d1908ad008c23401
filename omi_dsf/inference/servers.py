"""The reference lung model on the model servers AI providers run: `ai-service --server kserve|mlserver`.

Each server runs in its own Python environment, as a provider would build its image: KServe and
MLServer pin web-framework versions (fastapi, starlette) that differ from the project's. tools/setup.sh
makes them next to the project's environment: `<venv>-kserve` and `<venv>-mlserver` (<venv> is
`.venv` or $OMI_VENV); $OMI_KSERVE_PYTHON / $OMI_MLSERVER_PYTHON name another interpreter. The
server process gets the project on its PYTHONPATH and imports only the model (lungseg, tensors) and
its adapter (kserve_model, mlserver_runtime).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from omi_dsf import malloc
from omi_dsf.errors import UserError
from omi_dsf.processes import free_port

SERVERS = ("reference", "kserve", "mlserver")
MAX_GRPC_MESSAGE = 1 << 30
PROJECT = Path(__file__).resolve().parents[2]   # the folder holding omi_dsf/


def python_for(server: str) -> Path:
    """The interpreter of `server`'s own environment."""
    override = os.environ.get(f"OMI_{server.upper()}_PYTHON")
    if override:
        path = Path(override)
    else:
        path = Path(sys.prefix).with_name(Path(sys.prefix).name + f"-{server}") / "bin" / "python"
    if not path.exists():
        raise UserError(f"ai-service --server {server}: its environment {path} is missing; run tools/setup.sh "
                        f"(or set OMI_{server.upper()}_PYTHON)")
    return path


def _env() -> dict[str, str]:
    """The server's environment: the project on its PYTHONPATH; glibc's malloc settings for volumes
    (`malloc.ENVIRONMENT`) unless this process's environment sets them otherwise."""
    env = {**malloc.ENVIRONMENT, **os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), *filter(None, [env.get("PYTHONPATH")])])
    return env


KSERVE_DEFAULT_HTTP_PORT = 8080   # KServe serves TLS on 8443 instead when given this one


def kserve_command(port: int, max_slices: int, grpc_port: int | None = None,
                   tls: tuple[str, str] | None = None) -> list[str]:
    """KServe's model server with the lung model; `tls` (certfile, keyfile): HTTPS on `port` (no client
    certificates; its gRPC port has no TLS)."""
    # KServe's server always listens on all interfaces (0.0.0.0); gRPC only when a port is given
    grpc = ["--grpc_port", str(grpc_port), "--grpc_max_receive_message_length", str(MAX_GRPC_MESSAGE),
            "--grpc_max_send_message_length", str(MAX_GRPC_MESSAGE)] if grpc_port else ["--enable_grpc", "false"]
    https = ["--ssl_certfile", tls[0], "--ssl_keyfile", tls[1]] if tls else []
    return [str(python_for("kserve")), "-m", "omi_dsf.inference.kserve_model", "--http_port", str(port), *grpc,
            *https, "--max_slices", str(max_slices)]


def mlserver_model_settings(max_slices: int) -> dict:
    from omi_dsf.inference import lungseg   # scipy: not at every command's start

    meta = lungseg.LungSegModel(max_slices=max_slices).metadata()
    return {"name": meta["name"], "implementation": "omi_dsf.inference.mlserver_runtime.LungSegRuntime",
            "platform": meta["platform"], "versions": meta["versions"],
            "inputs": meta["inputs"], "outputs": meta["outputs"],
            "parameters": {"version": lungseg.VERSION, "extra": {"max_slices": max_slices}}}


def mlserver_repository(folder: Path, host: str, port: int, max_slices: int, metrics_port: int | None = None,
                        grpc_port: int | None = None) -> Path:
    """A model repository for `mlserver start`: settings.json and lung-seg/model-settings.json."""
    settings = {"host": host, "http_port": port,
                "grpc_port": grpc_port or free_port(host), "metrics_port": metrics_port or free_port(host),
                "grpc_max_message_length": MAX_GRPC_MESSAGE,   # a 600-slice 512x512 volume is 300 MB
                "parallel_workers": 0,       # infer in the server process: no copy of the volume to a worker
                "metrics_dir": str(folder / ".metrics")}
    (folder / "lung-seg").mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / "lung-seg" / "model-settings.json").write_text(json.dumps(mlserver_model_settings(max_slices), indent=2))
    return folder


def mlserver_command(folder: Path) -> list[str]:
    return [str(python_for("mlserver")), "-m", "mlserver.cli.main", "start", str(folder)]


def run(server: str, host: str, port: int, max_slices: int, grpc_port: int | None = None,
        metrics_port: int | None = None, tls: tuple[str, str] | None = None) -> int:
    """Run `server` with the lung model in the foreground until it ends or this process is stopped."""
    with tempfile.TemporaryDirectory(prefix=f"omi-ai-{server}-") as tmp:
        if server == "kserve":   # listens on all interfaces whatever `host` is (KServe's choice)
            argv = kserve_command(port, max_slices, grpc_port, tls)
        elif server == "mlserver":
            argv = mlserver_command(mlserver_repository(Path(tmp), host, port, max_slices, metrics_port=metrics_port,
                                                          grpc_port=grpc_port))
        else:
            raise UserError(f"ai-service --server {server!r}: one of {', '.join(SERVERS)}")
        child = subprocess.Popen(argv, env=_env(), cwd=tmp)

        def forward(signum, frame):   # a stop of this process stops the server
            child.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        return child.wait()
