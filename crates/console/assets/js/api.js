// REST API client: bearer token in the tab's session storage, the API's one
// error shape ({code, message, details}) turned into ApiError.

const TOKEN_KEY = 'pv_token';
const listeners = new Set();

/** An error answered by the API (or a network failure, status 0). */
export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `request failed (HTTP ${status})`);
    this.status = status;
    this.code = body && body.code ? body.code : 'error';
    this.details = body ? body.details : undefined;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(t) {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Called with no argument when the server says the session is gone. */
export function onUnauthenticated(fn) {
  listeners.add(fn);
}

async function parse(resp) {
  const text = await resp.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Calls the API: `api('GET', '/vms')`. Resolves to the JSON answer. */
export async function api(method, path, body, { auth = true, signal } = {}) {
  const headers = {};
  if (auth && token()) headers.Authorization = `Bearer ${token()}`;
  const init = { method, headers, signal };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(`/api/v1${path}`, init);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, { code: 'unreachable', message: `the server cannot be reached: ${e.message}` });
  }
  const data = await parse(resp);
  if (!resp.ok) {
    if (resp.status === 401 && auth) listeners.forEach((fn) => fn());
    throw new ApiError(resp.status, typeof data === 'object' ? data : { message: String(data || resp.statusText) });
  }
  return data;
}

/** Uploads a file with PUT, reporting progress: onProgress(sent, total). */
export function upload(path, file, onProgress) {
  const xhr = new XMLHttpRequest();
  const done = new Promise((resolve, reject) => {
    xhr.open('PUT', `/api/v1${path}`);
    xhr.setRequestHeader('Authorization', `Bearer ${token()}`);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = { message: xhr.responseText };
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.onerror = () => reject(new ApiError(0, { code: 'unreachable', message: 'the upload was interrupted (network error)' }));
    xhr.onabort = () => reject(new ApiError(0, { code: 'cancelled', message: 'the upload was cancelled' }));
    xhr.send(file);
  });
  return { done, cancel: () => xhr.abort() };
}

/**
 * Streams a VM's serial console log: calls onText(chunk) for the tail and
 * then for every new piece of output until `signal` aborts.
 */
export async function followConsole(name, onText, signal, tailBytes = 64 * 1024) {
  const resp = await fetch(`/api/v1/vms/${encodeURIComponent(name)}/console?follow=true&tail_bytes=${tailBytes}`, {
    headers: { Authorization: `Bearer ${token()}` },
    signal,
  });
  if (!resp.ok) throw new ApiError(resp.status, await parse(resp));
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(dec.decode(value, { stream: true }));
  }
}

/** URL of a live route, with the token as query parameter (EventSource, WebSocket). */
export function liveUrl(path, { ws = false } = {}) {
  const base = ws ? `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}` : '';
  return `${base}/api/v1${path}?access_token=${encodeURIComponent(token() || '')}`;
}
