"""A local S3-compatible server for storage tests: moto's threaded server on a free loopback port.

``local_s3()`` starts it, creates a bucket and returns the environment (endpoint, dummy credentials)
that points boto3, s3fs and pyarrow.fs (hence Ray Train's ``storage_path``) at it; ``s3_env`` is the
pytest fixture. Processes started with this environment (a Ray cluster's nodes, a subprocess) reach the
same server. Nothing here leaves the machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

BUCKET = "siclip-test"


@contextmanager
def local_s3(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """Run a moto S3 server with ``bucket`` created; yields the ``AWS_*`` variables that reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance profile that is not there
    }
    try:
        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """The server's variables, also set in this process for the module's tests (restored afterwards)."""
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
