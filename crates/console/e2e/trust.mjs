// HTTPS trust for the browser tests: the daemon's API is vouched for by its
// own CA (DATA/tls/api-ca.pem). Chromium is told to accept certificate
// chains that contain one of these public keys — exactly what an
// administrator gets by importing the CA, and nothing more (no blanket
// "ignore certificate errors"). Node's own fetch trusts the same file
// through NODE_EXTRA_CA_CERTS, set by the Rust test that runs us.

import { readFileSync } from 'node:fs';
import { X509Certificate, createHash } from 'node:crypto';

/** base64 SHA-256 of each certificate's SubjectPublicKeyInfo in a PEM file. */
export function spkiHashes(pemFile) {
  const pem = readFileSync(pemFile, 'utf8');
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) || [];
  if (blocks.length === 0) throw new Error(`${pemFile} holds no certificate`);
  return blocks.map((b) => {
    const der = new X509Certificate(b).publicKey.export({ type: 'spki', format: 'der' });
    return createHash('sha256').update(der).digest('base64');
  });
}

/** Chromium flags that trust the CA(s) in `pemFile`. */
export function chromiumTrustArgs(pemFile) {
  return [`--ignore-certificate-errors-spki-list=${spkiHashes(pemFile).join(',')}`];
}

/**
 * Checks that `page` was served over HTTPS by a Pairvisor API certificate,
 * and that plain HTTP on the same port redirects there.
 */
export async function checkHttps(page, url, assert, log) {
  const resp = await page.goto(`${url}/`);
  assert(new URL(page.url()).protocol === 'https:', `console served over HTTPS: ${page.url()}`);
  const sec = await resp.securityDetails();
  assert(sec && /Pairvisor API/.test(sec.issuer + ' ' + sec.subjectName),
    `certificate from the PM's API CA: ${sec && sec.issuer} / ${sec && sec.subjectName}`);
  const plain = url.replace(/^https:/, 'http:');
  await page.goto(`${plain}/`);
  assert(page.url().startsWith(`${url}/`), `http:// redirects to https://: ${page.url()}`);
  log(`HTTPS: ${sec.protocol} certificate ${sec.subjectName} issued by ${sec.issuer}; http:// redirects`);
}
