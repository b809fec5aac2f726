"""A real S3 API for tests: moto's server on 127.0.0.1, started and stopped by the tests themselves.

Reusable by any test module::

    from tests.s3_server import S3Server, s3_server  # noqa: F401  (the fixture must be imported by name)

    def test_x(s3_server: S3Server) -> None:
        s3_server.make_bucket("in")
        fs = s3_server.filesystem()          # an s3fs filesystem pointed at the server
        ...
        s3_server.stop(); s3_server.start()  # same port, same objects (moto keeps them in this process)

The fixture sets ``AWS_ENDPOINT_URL`` and dummy credentials in this process's environment, so siclip's own
fsspec/s3fs code (``s3://...`` paths) talks to the server unchanged; Ray tasks get the same variables
through :attr:`S3Server.env` (pass it as ``ray.env_vars``). Objects are wiped when the fixture ends.

For whole processes (a Ray cluster's nodes, a subprocess) and module-wide use, :func:`local_s3` runs a server
with one bucket and yields the environment that reaches it; ``s3_env`` is its module-scoped fixture.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

__all__ = ["BUCKET", "S3Server", "local_s3", "s3_env", "s3_server"]

BUCKET = "siclip-test"


class S3Server:
    """moto's threaded S3 server on a port it picks itself; :meth:`stop` / :meth:`start` keep the port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to reach this server: endpoint, dummy credentials, region."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # One try per request: a stopped server then fails in milliseconds, not after botocore's
            # backoff (~9 s); siclip's own retries (caption.max_retries) are what the tests exercise.
            "AWS_MAX_ATTEMPTS": "1",
        }

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start (or restart on the same port, with the same objects)."""
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        if self._server is not None:
            return
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server

    def stop(self) -> None:
        """Stop serving: clients get connection errors until :meth:`start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def filesystem(self) -> Any:
        """A fresh s3fs filesystem for this server (no instance or listing cache shared with the code under test)."""
        import s3fs

        return s3fs.S3FileSystem(
            key="testing",
            secret="testing",
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def make_bucket(self, name: str) -> None:
        self.filesystem().mkdir(name)

    def reset(self) -> None:
        """Delete every bucket and object (moto keeps them per process)."""
        from moto.s3.models import s3_backends  # moto's backends live in this process

        for account in list(s3_backends.keys()):
            for region in list(s3_backends[account].keys()):
                s3_backends[account][region].reset()


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A running :class:`S3Server`; this process's AWS environment points at it until the test ends."""
    import s3fs

    server = S3Server()
    server.start()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # instances made before would keep their old endpoints
    try:
        yield server
    finally:
        server.stop()
        server.reset()
        s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def local_s3(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """A running server with ``bucket`` created; yields the ``AWS_*`` variables that reach it, for this
    process and any process started with them (boto3, s3fs and pyarrow.fs, hence Ray Train's storage)."""
    server = S3Server()
    server.start()
    env = {k: v for k, v in server.env.items() if k != "AWS_MAX_ATTEMPTS"}  # storage writes may retry
    env |= {"AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # no instance-profile wait
    try:
        server.make_bucket(bucket)
        yield env
    finally:
        server.stop()
        server.reset()


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """:func:`local_s3`'s variables, also set in this process for the module's tests (restored afterwards)."""
    with local_s3() as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
