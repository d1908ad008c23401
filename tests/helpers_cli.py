"""`python -m omi_dsf ARGS` as a separate process, without paying the interpreter start and the imports
for every case: the test process imports the command line once and forks; the child starts with
no logging handlers (as a fresh interpreter does), writes to its own stdout/stderr pipes and exits
with what `omi_dsf.__main__` would exit with (an exception that escapes `main` prints its
traceback and exits 1, as the interpreter does). The last test of test_hostile_cli.py starts the
real `python -m omi_dsf`, which keeps the entry point itself covered."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_READY = False


def _import_parts() -> None:
    global _READY
    if not _READY:
        import importlib
        import pkgutil

        import omi_dsf.client
        import omi_dsf.dsf
        from omi_dsf import cli
        cli._parser(None)   # imports every part's command line once, in the parent
        for package in (omi_dsf.client, omi_dsf.dsf):   # and what the client commands import when run
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
        _READY = True


def _child(args: list[str], out_fd: int, err_fd: int, cwd: Path, env: dict | None) -> None:
    code = 1
    try:
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
        sys.stdin = open(os.devnull)
        os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(logging.WARNING)
        sys.argv = ["python -m omi_dsf", *args]
        from omi_dsf.cli import main
        code = main(list(args))
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(int(code) & 0xFF)


def run_cli(*args: str, timeout: float = 60, cwd: Path | str = ROOT, env: dict | None = None,
            ) -> subprocess.CompletedProcess:
    """Run the command line in a forked process; the result as `subprocess.run(..., text=True)` gives it."""
    _import_parts()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child never returns
        os.close(out_r)
        os.close(err_r)
        _child(list(args), out_w, err_w, Path(cwd), env)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                for fd in chunks:
                    os.close(fd)
                raise subprocess.TimeoutExpired(["python", "-m", "omi_dsf", *args], timeout)
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
                    os.close(key.fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return subprocess.CompletedProcess(["python", "-m", "omi_dsf", *args], code,
                                       b"".join(chunks[out_r]).decode("utf-8", "replace"),
                                       b"".join(chunks[err_r]).decode("utf-8", "replace"))
