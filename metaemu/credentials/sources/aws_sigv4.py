"""The AWS ``aws4_request`` subject token: a SigV4-signed STS ``GetCallerIdentity`` request,
serialized the way Google STS expects (upstream.md §3.1, §3.2).

Owns the AWS credential value, the verification-URL template, signing and serialization. Signing is
pure CPU on plain data, so it runs on the event loop; it takes the time from the caller (the
source's ``Clock``) instead of botocore's wall clock. Not owned here: where the credentials and the
region come from (``aws.py``, ``aws_imds.py``).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from metaemu.credentials.tokens import AWS_TOKEN_TYPE, SubjectToken
from metaemu.errors import ConfigError

#: Google's template for the regional GetCallerIdentity URL (google-auth
#: ``_DEFAULT_AWS_REGIONAL_CREDENTIAL_VERIFICATION_URL``; the ``regional_cred_verification_url`` of
#: every ``aws1`` credential configuration Google generates).
DEFAULT_VERIFICATION_URL = "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
#: The header that binds the signed request to one Workload Identity provider (upstream.md §3.1).
TARGET_RESOURCE_HEADER = "x-goog-cloud-target-resource"
_SERVICE = "sts"


@dataclass(frozen=True, slots=True, kw_only=True)
class AwsCredentials:
    """AWS credentials for one signature. SECURITY: the secret and session token never reach a repr."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.access_key_id or not self.secret_access_key:
            raise ValueError("AWS credentials need an access key id and a secret access key")


def validate_verification_url(template: str, key: str) -> str:
    """``template`` when it is an ``https`` URL with a host once ``{region}`` is filled in.

    google-auth refuses any other scheme ("Invalid AWS service URL", upstream.md §9), and Google calls
    this URL itself, so a plain-HTTP one could never verify. Raises ``ConfigError`` at ``key``.
    """
    try:
        parts = urlsplit(template.replace("{region}", "us-east-1"))
    except ValueError:
        raise ConfigError(key, f"not a URL: {template!r}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(key, f"must be an https URL with a host (Google calls it), got {template!r}")
    return template


def sign_caller_identity(credentials: AwsCredentials, *, region: str, url_template: str, target_resource: str,
                         now: dt.datetime) -> SubjectToken:
    """The ``aws4_request`` subject token for ``target_resource`` (the STS audience).

    Follows Google's botocore recipe (upstream.md §3.2): ``host`` and ``x-goog-cloud-target-resource``
    are set before signing, so both are among the ``SignedHeaders`` (§10.3 item 1), with an empty
    body. ``now`` (aware UTC) becomes ``X-Amz-Date``. The token has no readable expiry.
    """
    url = url_template.replace("{region}", region)
    host = urlsplit(url).hostname or ""
    request = AWSRequest(method="POST", url=url, data=b"",
                         headers={"host": host, TARGET_RESOURCE_HEADER: target_resource})
    _sign(request, credentials, region=region, now=now)
    serialized = {"url": url, "method": "POST",
                  "headers": [{"key": k, "value": v} for k, v in request.headers.items()]}
    return SubjectToken(value=serialize_signed_request(serialized), token_type=AWS_TOKEN_TYPE, expiry=None)


def serialize_signed_request(signed: dict[str, Any]) -> str:
    """URL-quoted compact JSON with sorted keys, as google-auth and Google's sample produce (§3.1)."""
    return quote(json.dumps(signed, separators=(",", ":"), sort_keys=True))


def _sign(request: AWSRequest, credentials: AwsCredentials, *, region: str, now: dt.datetime) -> None:
    """SigV4 over ``request`` at ``now`` with botocore's primitives.

    ``SigV4Auth.add_auth`` reads botocore's own wall clock; this is its body with the timestamp taken
    from the caller, using only the public canonicalization and signature steps.
    """
    signer = SigV4Auth(ReadOnlyCredentials(credentials.access_key_id, credentials.secret_access_key,
                                           credentials.session_token), _SERVICE, region)
    timestamp = now.astimezone(dt.UTC).strftime(SIGV4_TIMESTAMP)
    request.context["timestamp"] = timestamp
    request.headers["X-Amz-Date"] = timestamp
    if credentials.session_token:
        request.headers["X-Amz-Security-Token"] = credentials.session_token
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    signed_headers = signer.signed_headers(signer.headers_to_sign(request))
    request.headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={signer.scope(request)}, "
                                        f"SignedHeaders={signed_headers}, Signature={signature}")
