// Test driver for metaemu: runs the real, unmodified Java client library google-auth-library-java
// (com.google.auth.oauth2) against the metadata server named by GCE_METADATA_HOST.
//
// One source for both flavours judged by tests/clients/test_java_clients.py (clients.md §8.2):
//   * current: google-auth-library-oauth2-http pinned in tests/clients/java/current/pom.xml;
//   * debian:  libgoogle-auth-java 0.18 from /usr/share/java.
// The calls they share are made directly; the two that only the current library has
// (GoogleCredentials.getProjectId() and getUniverseDomain()) are looked up by reflection so this file
// compiles against both, and are reported as null (with "project_api"/"universe_api" false) where absent.
//
// Build: javac -cp JARS -d OUT MetaemuClient.java  (tests/clients/java_harness.py does it)
// Usage: java -cp OUT:JARS MetaemuClient AUDIENCE
// Prints ONE JSON object on its last stdout line:
//   {"available", "adc_type", "access_token", "expiry_unix", "email", "id_token", "project",
//    "project_api", "universe_domain", "universe_api"}
// or, on failure, {"error": "<message>", "stage": "<call>"} and exits 1.

import com.google.auth.oauth2.AccessToken;
import com.google.auth.oauth2.ComputeEngineCredentials;
import com.google.auth.oauth2.GoogleCredentials;
import com.google.auth.oauth2.IdTokenCredentials;
import com.google.auth.oauth2.IdTokenProvider;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;

public final class MetaemuClient {
  private static final String SCOPE = "https://www.googleapis.com/auth/cloud-platform";
  private static final String[] METADATA_ENV_VARS = {
    "GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"
  };

  private static volatile String stage = "startup";

  private MetaemuClient() {}

  public static void main(String[] args) {
    // Safety (clients.md §2, CL-13): without GCE_METADATA_HOST both flavours use
    // http://metadata.google.internal.
    for (String name : METADATA_ENV_VARS) {
      String value = System.getenv(name);
      if (value == null || value.isEmpty() || value.contains("169.254.169.254")
          || value.contains("metadata.google.internal")) {
        stage = "env";
        fail(name + " must point at a local metadata server (got " + quote(value) + ")");
      }
    }
    if (args.length < 1 || args[0].isEmpty()) {
      stage = "args";
      fail("usage: MetaemuClient AUDIENCE");
    }
    startWatchdog(timeoutMs());
    try {
      System.out.println(toJson(run(args[0])));
      System.out.flush();
      System.exit(0);
    } catch (Throwable t) { // report every failure as JSON, whatever its type
      fail(t.toString());
    }
  }

  private static Map<String, Object> run(String audience) throws Exception {
    Map<String, Object> out = new LinkedHashMap<>();

    // Detection: GET / must answer with Metadata-Flavor: Google (CL-01).
    stage = "GoogleCredentials.getApplicationDefault";
    GoogleCredentials adc = GoogleCredentials.getApplicationDefault();
    out.put("available", adc instanceof ComputeEngineCredentials);
    out.put("adc_type", adc.getClass().getName());

    stage = "GoogleCredentials.createScoped.refreshAccessToken";
    AccessToken token = adc.createScoped(Collections.singletonList(SCOPE)).refreshAccessToken();
    out.put("access_token", token.getTokenValue());
    out.put("expiry_unix", token.getExpirationTime() == null ? null : token.getExpirationTime().getTime() / 1000);

    ComputeEngineCredentials compute = ComputeEngineCredentials.create();
    stage = "ComputeEngineCredentials.getAccount";
    out.put("email", compute.getAccount());

    stage = "IdTokenCredentials.refresh";
    IdTokenCredentials idCreds = IdTokenCredentials.newBuilder()
        .setIdTokenProvider(compute)
        .setTargetAudience(audience)
        .setOptions(Collections.singletonList(IdTokenProvider.Option.FORMAT_FULL))
        .build();
    idCreds.refresh();
    out.put("id_token", idCreds.getIdToken().getTokenValue());

    stage = "ComputeEngineCredentials.getProjectId";
    putOptional(out, "project", "project_api", compute, "getProjectId");

    stage = "ComputeEngineCredentials.getUniverseDomain";
    putOptional(out, "universe_domain", "universe_api", compute, "getUniverseDomain");

    stage = "output";
    return out;
  }

  /** Calls a no-argument method that only some library versions have; apiKey says whether it exists. */
  private static void putOptional(Map<String, Object> out, String key, String apiKey, Object target,
      String method) throws Exception {
    Method m;
    try {
      m = target.getClass().getMethod(method);
    } catch (NoSuchMethodException absent) {
      out.put(key, null);
      out.put(apiKey, false);
      return;
    }
    try {
      out.put(key, m.invoke(target));
    } catch (InvocationTargetException e) {
      Throwable cause = e.getCause();
      throw cause instanceof Exception ? (Exception) cause : e;
    }
    out.put(apiKey, true);
  }

  private static long timeoutMs() {
    String ms = System.getenv("METAEMU_CLIENT_TIMEOUT_MS");
    try {
      return ms == null || ms.isEmpty() ? 45_000L : Long.parseLong(ms);
    } catch (NumberFormatException e) {
      return 45_000L;
    }
  }

  private static void startWatchdog(long ms) {
    Thread watchdog = new Thread(() -> {
      try {
        Thread.sleep(ms);
      } catch (InterruptedException e) {
        return;
      }
      fail("timed out after " + ms + " ms");
    }, "metaemu-watchdog");
    watchdog.setDaemon(true);
    watchdog.start();
  }

  private static synchronized void fail(String message) {
    Map<String, Object> err = new LinkedHashMap<>();
    err.put("error", message);
    err.put("stage", stage);
    System.out.println(toJson(err));
    System.out.flush();
    System.exit(1);
  }

  private static String toJson(Map<String, Object> map) {
    StringBuilder sb = new StringBuilder("{");
    for (Map.Entry<String, Object> e : map.entrySet()) {
      if (sb.length() > 1) {
        sb.append(", ");
      }
      sb.append(quote(e.getKey())).append(": ");
      Object v = e.getValue();
      sb.append(v == null ? "null" : v instanceof Boolean || v instanceof Number ? v.toString() : quote(v.toString()));
    }
    return sb.append('}').toString();
  }

  private static String quote(String s) {
    if (s == null) {
      return "null";
    }
    StringBuilder sb = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      switch (c) {
        case '"': sb.append("\\\""); break;
        case '\\': sb.append("\\\\"); break;
        case '\n': sb.append("\\n"); break;
        case '\r': sb.append("\\r"); break;
        case '\t': sb.append("\\t"); break;
        default:
          if (c < 0x20) {
            sb.append(String.format("\\u%04x", (int) c));
          } else {
            sb.append(c);
          }
      }
    }
    return sb.append('"').toString();
  }
}
