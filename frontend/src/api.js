// Small JSON client for the Rewardloop REST API (docs/API.md), session-cookie auth.

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status; // 0 = network error
    this.code = code;
    this.details = details || {};
  }
}

export function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  if (match) return decodeURIComponent(match[1]);
  // Fallback for CSRF_COOKIE_HTTPONLY deployments: the logout form carries a token.
  const input = document.querySelector('input[name="csrfmiddlewaretoken"]');
  return input ? input.value : '';
}

// crypto.randomUUID only exists in secure contexts; plain-http intranet hosts are common.
export function uuid() {
  if (window.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

async function errorFrom(resp) {
  let code = `http_${resp.status}`;
  let message = `Request failed (HTTP ${resp.status})`;
  let details = {};
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
      details = body.error.details || {};
    } else if (body && typeof body.detail === 'string') {
      message = body.detail;
    }
  } catch (_) {
    // Not JSON (a proxy error page, Django's CSRF failure page): keep the generic message.
  }
  return new ApiError(resp.status, code, message, details);
}

export async function request(method, url, body) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin' };
  if (method !== 'GET') {
    headers['Content-Type'] = 'application/json';
    headers['X-CSRFToken'] = csrfToken();
    init.body = JSON.stringify(body === undefined ? {} : body);
  }
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (_) {
    throw new ApiError(0, 'network', 'Network error: cannot reach the server');
  }
  if (!resp.ok) throw await errorFrom(resp);
  if (resp.status === 204) return null;
  try {
    return await resp.json();
  } catch (_) {
    // e.g. a login page after the session expired and a proxy redirected us.
    throw new ApiError(resp.status, 'bad_response', 'Unexpected response from the server (are you still logged in?)');
  }
}

// Network errors and 5xx are transient. 408/429 explicitly mean "try again later".
export function isRetryable(err) {
  return err instanceof ApiError && (err.status === 0 || err.status >= 500 || err.status === 408 || err.status === 429);
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Calls fn until it succeeds or fails with a non-retryable error. fn must be safe to repeat
// (POSTs reuse their idempotency key).
export async function withRetry(fn, { onRetry, maxDelay = 30000 } = {}) {
  let delay = 1000;
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await fn();
    } catch (err) {
      if (!isRetryable(err)) throw err;
      if (onRetry) onRetry(err, attempt);
      await sleep(delay + Math.random() * 250);
      delay = Math.min(delay * 2, maxDelay);
    }
  }
}
