"""``tamis web``: a live monitor of a project in the browser (pipeline, micrographs, 2D classes
with a selection you can correct and save as a new Select job, 3D map). Reads only the project's
files, so it follows RELION projects too. Binds to 127.0.0.1; binding elsewhere needs a token,
printed at start."""

from __future__ import annotations

import secrets
from pathlib import Path

import typer

from tamis.cli._common import console, user_errors
from tamis.errors import TamisError

LOCAL = ("127.0.0.1", "localhost", "::1")


@user_errors
def web(
    project: Path = typer.Option(Path("."), "--project", help="Project directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port."),
    token: str = typer.Option(
        None, "--token", help="Require this token (default off localhost: a random one)."
    ),
    poll_ms: int = typer.Option(3000, "--poll_ms", help="Live-update interval of the pages."),
) -> None:
    """Serve the monitor until interrupted."""
    import uvicorn

    from tamis.web.app import create_app

    if host not in LOCAL and not token:
        token = secrets.token_urlsafe(18)
    if token is not None and len(token) < 8:
        raise TamisError("--token: use at least 8 characters")
    app = create_app(project, token=token, poll_ms=poll_ms)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"tamis web: {Path(project).resolve()} at {url}", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")
