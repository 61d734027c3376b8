"""optuna-dashboard on a study's SQLite file.

The dashboard is a separate process (optuna-dashboard from this environment) so that it can run
beside a search: Optuna's SQLite storage lets it read while the search writes. It is only started
on a file that already has Optuna's schema, because optuna-dashboard exits on one without it.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from smskd_search.errors import UserError
from smskd_search.export import existing_studies, find_study_db
from smskd_search.search.storage import storage_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def latest_study_db(studies_dir: str | Path) -> Path:
    """The most recently modified study under ``studies_dir`` (what a user just searched)."""
    found = existing_studies(studies_dir)
    if not found:
        raise UserError(f"no studies in {studies_dir} (run a search first, or name a study)")
    return max(found, key=lambda p: p.stat().st_mtime)


def resolve_db(studies_dir: str | Path, study: str | None) -> Path:
    return (latest_study_db(studies_dir) if study is None else find_study_db(studies_dir, study)).resolve()


def dashboard_command(db: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """optuna-dashboard of this interpreter's environment: its console script, else its CLI entry.

    Not ``python -m optuna_dashboard``: optuna-dashboard 0.21 has no ``__main__`` module.
    """
    exe = Path(sys.executable).parent / "optuna-dashboard"
    if exe.is_file():
        head = [str(exe)]
    elif importlib.util.find_spec("optuna_dashboard") is not None:
        head = [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; sys.exit(main())"]
    else:
        raise UserError("optuna-dashboard is not installed in this environment (pip install optuna-dashboard)")
    return [*head, storage_url(db), "--host", host, "--port", str(port)]


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard/"


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Dashboard:
    process: subprocess.Popen
    db: Path
    host: str
    port: int

    @property
    def url(self) -> str:
        return url_for(self.host, self.port)

    @property
    def api(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/api"

    def get_json(self, path: str, timeout: float = 10.0) -> object:
        with urllib.request.urlopen(f"{self.api}/{path.lstrip('/')}", timeout=timeout) as r:
            return json.loads(r.read().decode())

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """True once the server answers ``/api/meta``; False if it exited or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                self.get_json("meta", timeout=2.0)
                return True
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.25)
        return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate our own process (by its pid), killing it if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode


def run_until_stopped(dash: Dashboard) -> int:
    """Wait for the dashboard; Ctrl-C or SIGTERM stop it too, so that it never outlives us."""
    def _on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        return dash.process.wait()
    except KeyboardInterrupt:
        dash.stop()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_dashboard(studies_dir: str | Path, study: str | None = None, *, host: str = DEFAULT_HOST,
                    port: int = DEFAULT_PORT, quiet: bool = False) -> Dashboard:
    """Start optuna-dashboard on the study (the latest one when ``study`` is None); returns at once."""
    db = resolve_db(studies_dir, study)
    if not port_free(host, port):
        raise UserError(f"--port {port}: {host}:{port} is already in use; choose another --port")
    cmd = dashboard_command(db, host, port)
    if quiet:
        cmd.append("--quiet")
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    return Dashboard(proc, db, host, port)


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Dashboard",
    "dashboard_command",
    "free_port",
    "latest_study_db",
    "port_free",
    "resolve_db",
    "run_until_stopped",
    "start_dashboard",
    "url_for",
]
