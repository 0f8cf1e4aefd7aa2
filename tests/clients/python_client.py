"""Drive the real Python clients (google-auth, google-cloud-storage) against a metadata server.

Run in its own process: google-auth reads GCE_METADATA_HOST when it is imported. Usage:
``python python_client.py AUDIENCE STORAGE_URL BUCKET``; prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def main() -> int:
    audience, storage_url, bucket = sys.argv[1:4]
    for var in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):  # clients.md CL-13
        if not os.environ.get(var, "").startswith("127.0.0.1:"):
            raise SystemExit(f"{var} must point at loopback")
    out: dict[str, Any] = {}
    stage = "import"
    try:
        import google.auth
        import google.auth.transport.requests
        from google.auth import compute_engine
        from google.cloud import storage
        from google.oauth2 import id_token

        request = google.auth.transport.requests.Request()
        stage = "default"
        creds, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        creds.refresh(request)
        out.update(adc_type=type(creds).__name__, project=project, access_token=creds.token,
                   email=getattr(creds, "service_account_email", None), universe_domain=creds.universe_domain)
        stage = "compute_engine"
        ce = compute_engine.Credentials()
        ce.refresh(request)
        out.update(ce_token=ce.token, ce_email=ce.service_account_email,
                   ce_expiry=ce.expiry.isoformat() if ce.expiry else None)
        stage = "id_token_credentials"
        idc = compute_engine.IDTokenCredentials(request, audience, use_metadata_identity_endpoint=True)
        idc.refresh(request)
        out["id_token"] = idc.token
        stage = "fetch_id_token"
        out["fetched_id_token"] = id_token.fetch_id_token(request, audience)
        stage = "storage"
        client = storage.Client(client_options={"api_endpoint": storage_url})
        out["storage_project"] = client.project
        out["blobs"] = [b.name for b in client.list_blobs(bucket)]
        out["bucket"] = client.get_bucket(bucket).name
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "stage": stage, **out}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
