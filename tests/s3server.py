"""An S3-compatible server on loopback for tests: moto's standalone server (moto[server]) on 127.0.0.1 and a free
port. `s3_environment` gives the variables a test (or a `pmd` subprocess) needs: dummy credentials and the
endpoint in AWS_ENDPOINT_URL, which pmd.storage passes to pyarrow's S3 client."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.ports import free_port



@contextlib.contextmanager
def s3_server(buckets: tuple[str, ...] = ("pmd",)) -> Iterator[dict[str, str]]:
    """Start the server, create `buckets`, yield the environment that points clients at it; stop it after."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        s3 = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                               endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
        for bucket in buckets:
            s3.create_dir(bucket)
        yield env
    finally:
        server.stop()
