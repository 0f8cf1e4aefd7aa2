"""Run the real Java client library, google-auth-library-java, against a metadata server on loopback.

Two flavours of the same library, both judged by ``tests/clients/test_java_clients.py`` (clients.md §8.2):

* ``current``: ``com.google.auth:google-auth-library-oauth2-http`` from Maven Central, pinned in
  ``tests/clients/java/current/pom.xml``; ``scripts/install-clients.sh`` copies it and its runtime
  dependencies into ``tests/clients/java/current/build/lib`` (git-ignored), so no test touches the network;
* ``debian``: Debian's ``libgoogle-auth-java`` 0.18 (2019), jars under ``/usr/share/java``.

One driver, ``tests/clients/java/src/MetaemuClient.java``, is compiled with ``javac`` against each flavour's
jars (once per process and flavour) and run with the isolated environment of :func:`harness.client_env`,
re-checked before every start (CL-13), so no client can fall back to 169.254.169.254 or
``metadata.google.internal``.

Typical use::

    client = build_java_client(tmp_path / "java", "current")
    out = run_java_client(client, harness.client_env(server_addr, tmp_path), "https://example.test/aud")
"""

from __future__ import annotations

import os
import shutil
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.clients import harness

__all__ = [
    "DEBIAN_JARS",
    "FLAVOURS",
    "JAVA_DIR",
    "JavaClient",
    "Flavour",
    "build_java_client",
    "java_available",
    "java_missing",
    "run_java_client",
]

Flavour = Literal["current", "debian"]
FLAVOURS: tuple[Flavour, ...] = ("current", "debian")

JAVA_DIR = harness.CLIENTS_DIR / "java"
SOURCE = JAVA_DIR / "src" / "MetaemuClient.java"
MAIN_CLASS = "MetaemuClient"
CURRENT_POM = JAVA_DIR / "current" / "pom.xml"
CURRENT_LIB = JAVA_DIR / "current" / "build" / "lib"
#: Written by scripts/install-clients.sh after a successful copy of the current flavour's jars.
CURRENT_STAMP = CURRENT_LIB / ".installed"
DEBIAN_JAVA = Path("/usr/share/java")

#: The classpath of the Debian flavour: clients.md §8.2 (libgoogle-auth-java 0.18.0-2 and its dependencies).
DEBIAN_JARS = (
    "google-auth-library-oauth2-http",
    "google-auth-library-credentials",
    "google-http-client",
    "google-http-client-gson",
    "google-http-client-jackson2",
    "guava",
    "gson",
    "jackson-core",
    "httpclient",
    "httpcore",
    "commons-logging",
    "commons-codec",
    "opencensus-api",
    "opencensus-contrib-http-util",
    "grpc-context",
    "auto-value-annotations",
    "jsr305",
)

#: JVM flags that keep a short-lived client quick: the class-data-sharing archive when there is one, and the
#: C1 compiler only (a 1 s run never reaches C2).
JVM_FLAGS = ("-Xshare:auto", "-XX:TieredStopAtLevel=1")

_POM_PROPERTIES = "META-INF/maven/com.google.auth/google-auth-library-oauth2-http/pom.properties"

_build_lock = threading.Lock()
_built: dict[Flavour, JavaClient] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class JavaClient:
    """A compiled driver: ``java -cp classpath MetaemuClient AUDIENCE`` runs it."""

    flavour: Flavour
    classpath: tuple[Path, ...]
    #: Version of google-auth-library-oauth2-http on the classpath, from the jar's pom.properties.
    library_version: str


# --------------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------------


def _library_jars(flavour: Flavour) -> list[Path]:
    if flavour == "current":
        return sorted(CURRENT_LIB.glob("*.jar"))
    return [DEBIAN_JAVA / f"{name}.jar" for name in DEBIAN_JARS]


def java_missing(flavour: Flavour) -> str | None:
    """Why the ``flavour`` client cannot be built here, or ``None`` when it can."""
    for tool in ("java", "javac"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH: run scripts/install-clients.sh"
    if flavour == "current":
        if not CURRENT_STAMP.is_file() or CURRENT_STAMP.stat().st_mtime < CURRENT_POM.stat().st_mtime:
            return f"{CURRENT_LIB} is missing or older than {CURRENT_POM.name}: run scripts/install-clients.sh"
        return None
    absent = [jar.name for jar in _library_jars(flavour) if not jar.is_file()]
    if absent:
        return f"Debian libgoogle-auth-java jars missing from {DEBIAN_JAVA} ({absent}): run scripts/install-clients.sh"
    return None


def java_available(flavour: Flavour) -> bool:
    """``java``/``javac`` are on PATH and the ``flavour`` library's jars are installed."""
    return java_missing(flavour) is None


def _library_version(jars: list[Path]) -> str:
    """The ``version`` in the library jar's own ``pom.properties`` (Debian's jar names carry none)."""
    for jar in jars:
        if jar.name.startswith("google-auth-library-oauth2-http"):
            with zipfile.ZipFile(jar) as archive:
                props = archive.read(_POM_PROPERTIES).decode()
            for line in props.splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "version":
                    return value.strip()
    raise AssertionError(f"no google-auth-library-oauth2-http jar with a version among {[j.name for j in jars]}")


# --------------------------------------------------------------------------------------------------------
# Building and running
# --------------------------------------------------------------------------------------------------------


def build_java_client(out_dir: Path, flavour: Flavour, *, timeout: float = 120.0) -> JavaClient:
    """Compile the driver against the ``flavour`` jars into ``out_dir/flavour``; return how to run it.

    Built once per process and flavour: later calls return the first build while its class file still
    exists. Raises ``AssertionError`` (with the install hint) when the flavour is not installed, and with
    javac's output when compilation fails.
    """
    with _build_lock:
        cached = _built.get(flavour)
        if cached is not None and (cached.classpath[0] / f"{MAIN_CLASS}.class").is_file():
            return cached
        missing = java_missing(flavour)
        assert missing is None, missing
        jars = _library_jars(flavour)
        classes = out_dir / flavour
        classes.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(out_dir), "LANG": "C.UTF-8"}
        argv = ["javac", "-encoding", "UTF-8", "-nowarn", "-cp", os.pathsep.join(map(str, jars)),
                "-d", str(classes), str(SOURCE)]
        proc = harness._run(argv, env, timeout)
        if proc.returncode != 0 or not (classes / f"{MAIN_CLASS}.class").is_file():
            raise AssertionError(
                f"javac failed for the {flavour} Java client (exit {proc.returncode})\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        client = JavaClient(flavour=flavour, classpath=(classes, *jars), library_version=_library_version(jars))
        _built[flavour] = client
        return client


def run_java_client(
    client: JavaClient, env: dict[str, str], audience: str, *, timeout: float = harness.DEFAULT_TIMEOUT,
    check: bool = True,
) -> dict[str, Any]:
    """Run ``MetaemuClient AUDIENCE``; return its JSON object.

    Keys: ``available`` (ADC chose ``ComputeEngineCredentials``), ``adc_type``, ``access_token`` and
    ``expiry_unix`` (ADC ``createScoped(cloud-platform).refreshAccessToken()``), ``email``
    (``getAccount()``), ``id_token`` (``IdTokenCredentials``, ``FORMAT_FULL``), ``project`` /
    ``project_api`` and ``universe_domain`` / ``universe_api`` (``null`` / ``False`` where the library has
    no ``getProjectId()`` / ``getUniverseDomain()``, as 0.18). With ``check=False`` an ``{"error",
    "stage"}`` object is returned instead of raising. ``user.home`` and ``java.io.tmpdir`` follow the
    isolated ``HOME`` and ``TMPDIR``: the JVM reads the home directory from the password database, not
    ``$HOME``.
    """
    harness._check_env(env)
    java = shutil.which("java")
    assert java is not None, "java is not on PATH: run scripts/install-clients.sh"
    argv = [
        java, *JVM_FLAGS, f"-Duser.home={env['HOME']}", f"-Djava.io.tmpdir={env.get('TMPDIR', env['HOME'])}",
        "-cp", os.pathsep.join(map(str, client.classpath)), MAIN_CLASS, audience,
    ]
    proc = harness._run(argv, env, timeout)
    return harness._parse_json_result(f"java ({client.flavour} {client.library_version})", proc, check)
