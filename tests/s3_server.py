"""The pytest fixture of a real S3-compatible server (SeaweedFS ``weed mini`` on 127.0.0.1, started by
``data_prep.local_s3.S3Server``): one per test module, with its standard AWS variables in os.environ.

Example::

    from s3_server import s3_server          # tests/ is on sys.path under pytest

    def test_upload(s3_server):
        s3_server.client().put_object(Bucket="shards", Key="a.txt", Body=b"hi")
"""

from __future__ import annotations

import os

import pytest

from data_prep.local_s3 import ACCESS_KEY, SECRET_KEY, S3Server

__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Server", "s3_server"]


@pytest.fixture(scope="module")
def s3_server():
    """One SeaweedFS server per test module, with its standard AWS variables set in os.environ."""
    with S3Server(bucket="shards") as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
