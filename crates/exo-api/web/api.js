// The node's HTTP API as the page uses it: the API key as a bearer token, OpenAI's error
// envelope turned into an ApiError, and server-sent events read from a fetch response
// (EventSource cannot send a key).

const KEY_SLOT = 'exo-api-key';

/** Whether the node said, in the page itself, that its /v1 routes want a key. */
export const keyRequired =
  document.querySelector('meta[name="exo-auth"]')?.getAttribute('content') === 'key';

/** The key for this tab (sessionStorage: it is gone when the tab is closed). */
export function apiKey() {
  return sessionStorage.getItem(KEY_SLOT) ?? '';
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

/** A refusal from the node (status and OpenAI error code), or a network failure (status 0). */
export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Sends one request; resolves to the response when it is 2xx, throws an ApiError otherwise. */
export async function request(path, { method = 'GET', body, signal } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(0, `cannot reach the node (${error.message})`);
  }
  if (!response.ok) throw await refusal(response);
  return response;
}

export async function getJson(path, options) {
  return (await request(path, options)).json();
}

async function refusal(response) {
  let message = response.statusText || 'request failed';
  let code = null;
  try {
    const envelope = await response.json();
    message = envelope.error?.message ?? message;
    code = envelope.error?.code ?? null;
  } catch {
    // Not an OpenAI envelope: keep the status text.
  }
  return new ApiError(response.status, message, code);
}

/** An ApiError from an error envelope that arrived inside a stream. */
export function streamError(envelope) {
  const code = envelope.error?.code ?? null;
  const status = code === 'rate_limit_exceeded' ? 429 : code === 'invalid_api_key' ? 401 : 503;
  return new ApiError(status, envelope.error?.message ?? 'the stream failed', code);
}

/** The events of a server-sent event stream: `{event, data}`, in order; comments skipped. */
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
        let event = 'message';
        const data = [];
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith(':')) continue;
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'event') event = text;
          else if (field === 'data') data.push(text);
        }
        if (data.length) yield { event, data: data.join('\n') };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** Bytes as people read them. */
export function bytes(n) {
  if (n == null || !Number.isFinite(n)) return '?';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

/** Creates an element with attributes (`class`, `data-*`, ...) and children (text or nodes). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value != null && value !== false) node.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child != null && child !== false) node.append(child);
  }
  return node;
}
