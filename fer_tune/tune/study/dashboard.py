"""optuna-dashboard (github.com/optuna/optuna-dashboard) over a study's Optuna storage, on 127.0.0.1 only.

The storage is the one study.json records: a sqlite file, a database URL, or env:VAR, whose URL (with its password)
is read from the environment and never printed. optuna-dashboard's WSGI app is served by wsgiref without its
per-request access log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ...common import FerTuneError
from .record import read_study, resolve_storage

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
INSTALL = "pip install -e '.[dashboard]' (or pip install 'optuna-dashboard>=0.21,<0.22')"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


def dashboard_server(study_dir: str | Path, port: int) -> tuple[WSGIServer, str]:
    """(the server, not yet serving; the study page's URL) for the study in `study_dir`."""
    try:
        import optuna_dashboard
    except ImportError:
        raise FerTuneError(f"fer-tune dashboard needs optuna-dashboard: {INSTALL}") from None
    record = read_study(study_dir)
    storage = resolve_storage(record["storage"])
    if not 0 <= port <= 65535:
        raise FerTuneError(f"--port {port}: a port is 0..65535 (0: any free one)")
    try:
        server = make_server(HOST, port, optuna_dashboard.wsgi(storage), handler_class=_QuietHandler)
    except OSError as exc:
        raise FerTuneError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}); pass another --port") from None
    try:
        study_id = storage.get_study_id_from_name(record["optuna_study"])
    except KeyError:
        server.server_close()
        raise FerTuneError(
            f"the Optuna storage of {study_dir} holds no study named {record['optuna_study']!r}"
        ) from None
    return server, f"http://{HOST}:{server.server_port}/dashboard/studies/{study_id}"


def serve(study_dir: str | Path, port: int) -> int:
    """Serve the dashboard until Ctrl-C (exit 0)."""
    server, url = dashboard_server(study_dir, port)
    log.info("optuna-dashboard for %s: %s (Ctrl-C stops it)", Path(study_dir).resolve().name, url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
