"""Create-if-absent on S3: a conditional PUT (`If-None-Match: *`) through boto3.

Object stores have no hard link and no rename, so the registry's first-writer-wins rule needs the
store's own help: S3 (and S3-protocol servers that implement it) refuses a PUT with
`If-None-Match: *` when the key exists, atomically. pyarrow's S3 client cannot send that header,
so this module does, with the same endpoint and credentials: endpoint from the root URI's
`endpoint_override` / `scheme` query (as pyarrow reads it) or AWS_ENDPOINT_URL, credentials only
from the standard AWS environment variables, profile or instance role, never from a config.
Without boto3 (the `s3` extra) the registry falls back to write-then-verify.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)


class ConditionalPut:
    """PUTs to the bucket of one s3:// root, optionally refused when the key exists."""

    def __init__(self, root: str) -> None:
        import boto3

        query = {k: v[-1] for k, v in parse_qs(urlsplit(root).query).items()}
        options: dict[str, Any] = {}
        if "endpoint_override" in query:
            endpoint = query["endpoint_override"]
            if "://" not in endpoint:
                endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
            options["endpoint_url"] = endpoint
        if "region" in query:
            options["region_name"] = query["region"]
        self._client = boto3.client("s3", **options)

    def put(self, path: str, data: bytes, *, only_if_absent: bool) -> bool:
        """PUT `data` at `path` ("bucket/key"); False when only_if_absent and the key exists."""
        bucket, _, key = path.partition("/")
        extra = {"IfNoneMatch": "*"} if only_if_absent else {}
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        except Exception as exc:  # botocore's ClientError, without importing botocore here
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if only_if_absent and code in ("PreconditionFailed", "412",
                                           "ConditionalRequestConflict"):
                return False
            raise OSError(f"s3://{path}: {exc}") from None
        return True


def conditional_put(fs: pafs.FileSystem, root: str) -> ConditionalPut | None:
    """A ConditionalPut for an S3 root, or None (another file system, or boto3 missing)."""
    if not isinstance(fs, pafs.S3FileSystem):
        return None
    try:
        return ConditionalPut(root)
    except ImportError:
        logger.warning("boto3 is not installed: first-writer-wins on %s falls back to "
                       "write-then-verify (install supsup-pipeline[s3])", root)
        return None
