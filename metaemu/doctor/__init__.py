"""``metaemu doctor``: run the credential chain step by step and stop at the first broken link with
the exact fix (issue #14).

Modules, one concept each: ``report`` (a step's result, the report, human and JSON rendering),
``subject`` (what a subject token says, decoded, never printed whole), ``diagnosis`` (an STS, IAM or
Kubernetes ``UpstreamError`` mapped to its cause and fix), ``chain`` (config, subject token, STS
exchange, impersonation over the product's own pipeline pieces), ``reachability`` (the metadata
names and address as an app sees them), ``node`` (node mode: interception rules, the pod via the
API), ``cli`` (flags, exit status).
"""
