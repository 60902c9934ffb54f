"""Start, wait for and stop a `bentoml serve` subprocess: one way for `python -m pipeline serve`, the
tests and the benchmarks (not imported by the service, so not packed into the Bento).

The child dies with the process that started it (serving.lifetime), and its worker dies with it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving.lifetime import parent_death_preexec

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "serving.service:ImageClassifier"


def serve_command(host: str, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("bentoml")
    return ([str(exe)] if exe.exists() else [sys.executable, "-m", "bentoml"]) + [
        "serve", SERVICE, "--host", host, "--port", str(port), "--working-dir", str(REPO_ROOT)]


def launch(env_extra: dict, host: str = "127.0.0.1", port: int = 3000, *, stdout=None,
           new_session: bool = False) -> subprocess.Popen:
    """`bentoml serve` with os.environ + env_extra (EDGEPIPE_* settings); it gets SIGTERM if we die.

    new_session=True puts it in a process group of its own (tests and benchmarks stop it with
    os.killpg); the interactive launcher keeps it in its own group so Ctrl-C reaches it directly.
    """
    env = {**os.environ, **env_extra, "BENTOML_DO_NOT_TRACK": "True"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.Popen(serve_command(host, port), env=env, cwd=str(REPO_ROOT), stdout=stdout,
                            stderr=subprocess.STDOUT if stdout is not None else None,
                            start_new_session=new_session, preexec_fn=parent_death_preexec(signal.SIGTERM))


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 60, log: Path | None = None):
    """Poll GET /readyz until 200; raise with the server's log tail if it exits or takes too long."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"the server exited with code {proc.returncode}\n{tail}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    """SIGTERM to the server's process group (it was started with new_session=True), SIGKILL if it hangs."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
    return proc.returncode
