"""Real `mlflow server` processes for the slow tests: a SQLite or PostgreSQL backend, proxied artifacts, and
optionally MLflow's basic-auth app. Used by test_server, test_ui and test_concurrency.

    server = start_server(tmp, "sqlite:///...", auth=True)   # waits for /health
    ...
    server.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADMIN = ("admin", "admin-password-1234")


@dataclass
class Server:
    uri: str
    proc: subprocess.Popen
    log: Path
    artifacts: Path
    admin: tuple[str, str] | None = None
    users: dict[str, str] = field(default_factory=dict)

    def env(self, user: str | None = None) -> dict[str, str]:
        """Environment for a client process: this server, and a user's credentials when auth is on."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_RUN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))}
        env |= {"MLFLOW_TRACKING_URI": self.uri, "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if self.admin:
            name = user or self.admin[0]
            env |= {"MLFLOW_TRACKING_USERNAME": name,
                    "MLFLOW_TRACKING_PASSWORD": self.admin[1] if name == self.admin[0] else self.users[name]}
        return env

    def add_user(self, name: str, password: str) -> None:
        """Create a user through the auth app's client, as the admin."""
        from mlflow.server import get_app_client

        keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update(zip(keys, self.admin, strict=True))  # the auth client reads credentials from here
        try:
            get_app_client("basic-auth", tracking_uri=self.uri).create_user(name, password)
        finally:
            for key, value in saved.items():
                if value is None:
                    del os.environ[key]
                else:
                    os.environ[key] = value
        self.users[name] = password

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: its own session
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, backend_uri: str, auth: bool = False, timeout_s: float = 240,
                 port: int | None = None) -> Server:
    """`mlflow server` on a free port (or `port`: a restart after an outage) with artifacts proxied into
    root/artifacts; raises with its log on failure."""
    root.mkdir(parents=True, exist_ok=True)
    port, log, artifacts = port or free_port(), root / "server.log", root / "artifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner process: less to start
    if auth:
        ini = root / "basic_auth.ini"
        # NO_PERMISSIONS: a user reads only the experiments they created or were granted, like separate teams.
        ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                       f"database_uri = sqlite:///{root}/basic_auth.db\n"
                       f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       "auth_cache_ttl_seconds = 60\n")
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "ablab-tests-only"}
        cmd += ["--app-name", "basic-auth"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log, artifacts, ADMIN if auth else None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def start_postgres(root: Path) -> tuple[str | None, str]:
    """(SQLAlchemy URI, "") from scripts/start_postgres.sh, or (None, why) when PostgreSQL cannot be had."""
    try:
        import psycopg2  # noqa: F401 - the driver the URI names
    except ImportError:
        return None, "psycopg2 is not installed (pip install psycopg2-binary; it is in the test extras)"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "start_postgres.sh"), str(root)], capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode == 3:
        return None, f"PostgreSQL cannot be installed here: {done.stderr.strip().splitlines()[-1]}"
    if done.returncode != 0:
        raise RuntimeError(f"scripts/start_postgres.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1], ""


def stop_postgres(root: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "start_postgres.sh"), "--stop", str(root)], capture_output=True,
                   timeout=120, check=False)
