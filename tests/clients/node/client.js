#!/usr/bin/env node
// Test driver for metaemu: runs the real, unmodified gcp-metadata and google-auth-library
// against the metadata server named by GCE_METADATA_IP / GCE_METADATA_HOST.
//
// Usage: node client.js AUDIENCE
// Prints ONE JSON object on stdout:
//   {"available", "project", "email", "access_token", "auth_header", "id_token", "auth_project",
//    "universe_domain"}
// or, on failure, {"error": "<message>", "stage": "<call>"} and exits 1.
'use strict';

const STAGE_TIMEOUT_MS = Number(process.env.METAEMU_CLIENT_TIMEOUT_MS || 45000);
const SCOPE = 'https://www.googleapis.com/auth/cloud-platform';

let stage = 'startup';

function fail(message) {
  process.stdout.write(JSON.stringify({error: String(message), stage}) + '\n');
  process.exit(1);
}

// Safety (clients.md §2, CL-13): never fall back to 169.254.169.254 / metadata.google.internal.
for (const name of ['GCE_METADATA_HOST', 'GCE_METADATA_IP', 'GCE_METADATA_ROOT']) {
  const value = process.env[name] || '';
  if (value === '' || /169\.254\.169\.254|metadata\.google\.internal/.test(value)) {
    stage = 'env';
    fail(`${name} must point at a local metadata server (got ${JSON.stringify(value)})`);
  }
}

const audience = process.argv[2];
if (!audience) {
  stage = 'args';
  fail('usage: client.js AUDIENCE');
}

const watchdog = setTimeout(() => fail(`timed out after ${STAGE_TIMEOUT_MS} ms`), STAGE_TIMEOUT_MS);

function headerValue(headers, name) {
  if (!headers) return null;
  if (typeof headers.get === 'function') return headers.get(name); // v10: a fetch Headers object
  for (const key of Object.keys(headers)) {
    if (key.toLowerCase() === name) return headers[key];
  }
  return null;
}

async function main() {
  stage = 'require';
  const gcpMetadata = require('gcp-metadata');
  const {GoogleAuth} = require('google-auth-library');

  const out = {};

  stage = 'gcpMetadata.isAvailable';
  out.available = await gcpMetadata.isAvailable();

  stage = 'gcpMetadata.project';
  out.project = await gcpMetadata.project('project-id');

  stage = 'gcpMetadata.instance';
  out.email = await gcpMetadata.instance('service-accounts/default/email');

  const auth = new GoogleAuth({scopes: [SCOPE]});

  stage = 'GoogleAuth.getAccessToken';
  out.access_token = await auth.getAccessToken();

  stage = 'GoogleAuth.getRequestHeaders';
  out.auth_header = headerValue(await auth.getRequestHeaders(), 'authorization');

  stage = 'GoogleAuth.getIdTokenClient';
  const idClient = await auth.getIdTokenClient(audience);

  stage = 'idTokenProvider.fetchIdToken';
  out.id_token = await idClient.idTokenProvider.fetchIdToken(audience);

  stage = 'GoogleAuth.getProjectId';
  out.auth_project = await auth.getProjectId();

  // Not in the brief's list, but the only way this library version asks for universe/universe-domain
  // (clients.md CL-11); it runs last so the requests above keep their order.
  stage = 'GoogleAuth.getUniverseDomainFromMetadataServer';
  out.universe_domain = await auth.getUniverseDomainFromMetadataServer();

  stage = 'output';
  process.stdout.write(JSON.stringify({
    available: out.available,
    project: out.project,
    email: out.email,
    access_token: out.access_token,
    auth_header: out.auth_header,
    id_token: out.id_token,
    auth_project: out.auth_project,
    universe_domain: out.universe_domain,
  }) + '\n');
  clearTimeout(watchdog);
}

main().then(
  () => process.exit(0),
  (err) => fail(err && err.message ? err.message : err),
);
