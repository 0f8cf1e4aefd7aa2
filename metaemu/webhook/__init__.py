"""``metaemu webhook``: a mutating admission webhook that injects sidecar mode into pods that opt in
(issue #14).

Modules: ``settings`` (its configuration), ``jsonpatch`` (RFC 6902 operations and RFC 6901 pointers),
``sidecar`` (what is injected), ``injection`` (whether and how a pod is injected: a pure function
of the pod, its namespace and its service account), ``review`` (the ``admission.k8s.io/v1``
AdmissionReview wire format), ``kube`` (the three API calls it makes), ``certs`` (a self-generated
serving certificate) and ``server`` (the HTTPS app and the CA-bundle writer).
"""
