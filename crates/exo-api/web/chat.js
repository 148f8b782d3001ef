// The chat: a model picker, settings, multi-turn history kept in this browser, answers streamed
// from /v1/chat/completions, a stop button, and figures under each answer.

import { ApiError, el, events, request, streamError } from './api.js';

const HISTORY_SLOT = 'exo-chat-history';
const $ = (id) => document.getElementById(id);

export class Chat {
  /** `onRefused(error)` is told when the node refuses the key (401). */
  constructor({ onRefused }) {
    this.onRefused = onRefused;
    this.history = load();
    this.running = null;
    $('composer').addEventListener('submit', (event) => {
      event.preventDefault();
      this.send();
    });
    $('prompt').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    $('stop').addEventListener('click', () => this.running?.abort());
    $('clear').addEventListener('click', () => {
      this.running?.abort();
      this.history = [];
      save(this.history);
      this.render();
    });
    this.render();
  }

  /** Fills the model picker, keeping the choice when it is still offered. */
  setModels(ids) {
    const select = $('model');
    const chosen = select.value;
    select.replaceChildren(...ids.map((id) => el('option', { value: id }, id)));
    if (ids.includes(chosen)) select.value = chosen;
    select.disabled = ids.length === 0;
    if (!ids.length) select.append(el('option', { value: '' }, 'no model yet'));
  }

  async send() {
    const prompt = $('prompt');
    const text = prompt.value.trim();
    if (!text || this.running) return;
    prompt.value = '';
    this.history.push({ role: 'user', content: text });
    const answer = { role: 'assistant', content: '', state: 'streaming', chunks: 0 };
    this.history.push(answer);
    this.render();
    const controller = new AbortController();
    this.running = controller;
    this.busy(true);
    const view = $('messages').lastElementChild;
    const started = performance.now();
    let first = null;
    let usage = null;
    try {
      const response = await request('/v1/chat/completions', {
        method: 'POST',
        body: this.body(),
        signal: controller.signal,
      });
      for await (const { data } of events(response)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw streamError(chunk);
        if (chunk.usage) usage = chunk.usage;
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) {
          first ??= performance.now();
          answer.content += piece;
          answer.chunks += 1;
          fill(view, answer);
        }
      }
      answer.state = 'done';
    } catch (error) {
      if (error.name === 'AbortError') {
        answer.state = 'stopped';
      } else {
        answer.state = 'error';
        answer.error = describe(error);
        if (error instanceof ApiError && error.status === 401) this.onRefused(error);
      }
    } finally {
      const ended = performance.now();
      const tokens = usage?.completion_tokens ?? answer.chunks;
      answer.figures = {
        tokens,
        ttftMs: first == null ? null : first - started,
        // Tokens after the first, over the time after the first: the decode rate.
        tokensPerS: first != null && tokens > 1 && ended > first
          ? ((tokens - 1) * 1000) / (ended - first) : null,
      };
      this.running = null;
      this.busy(false);
      save(this.history);
      fill(view, answer);
      prompt.focus();
    }
  }

  /** The request: the system prompt, every finished turn, and the settings. */
  body() {
    const messages = [];
    const system = $('system').value.trim();
    if (system) messages.push({ role: 'system', content: system });
    for (const turn of this.history) {
      if (turn.role === 'user') messages.push({ role: 'user', content: turn.content });
      else if (turn.content && turn.state !== 'streaming') {
        messages.push({ role: 'assistant', content: turn.content });
      }
    }
    const body = {
      model: $('model').value,
      messages,
      stream: true,
      stream_options: { include_usage: true },
    };
    const temperature = Number.parseFloat($('temperature').value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = Number.parseInt($('max-tokens').value, 10);
    if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  busy(running) {
    $('send').hidden = running;
    $('stop').hidden = !running;
  }

  render() {
    const list = $('messages');
    list.replaceChildren(
      ...this.history.map((turn) => {
        const item = el('li', { class: `turn ${turn.role}` });
        fill(item, turn);
        return item;
      }),
    );
    $('empty').hidden = this.history.length > 0;
    list.lastElementChild?.scrollIntoView({ block: 'end' });
  }
}

/** Draws one turn: its text and, under an answer, how it went. */
function fill(item, turn) {
  const parts = [el('div', { class: 'text' }, turn.content)];
  if (turn.role === 'assistant') {
    item.dataset.state = turn.state ?? 'done';
    item.dataset.chunks = String(turn.chunks ?? 0);
    if (turn.state === 'streaming' && !turn.content) parts.push(el('div', { class: 'figures' }, 'waiting for the first token…'));
    if (turn.error) parts.push(el('div', { class: 'error' }, turn.error));
    const figures = describeFigures(turn);
    if (figures) parts.push(el('div', { class: 'figures' }, figures));
  }
  item.replaceChildren(...parts);
  item.scrollIntoView({ block: 'end' });
}

function describeFigures(turn) {
  const f = turn.figures;
  if (!f || turn.state === 'streaming') return '';
  const parts = [`${f.tokens} token${f.tokens === 1 ? '' : 's'}`];
  if (f.tokensPerS != null) parts.push(`${f.tokensPerS.toFixed(1)} tokens/s`);
  if (f.ttftMs != null) parts.push(`first token ${Math.round(f.ttftMs)} ms`);
  if (turn.state === 'stopped') parts.push('stopped');
  return parts.join(' · ');
}

/** What went wrong, in words a person can act on. */
function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong: ${error.message}`;
  switch (error.status) {
    case 0: return `The node cannot be reached: ${error.message}`;
    case 401: return `The API key is missing or wrong (401): ${error.message}`;
    case 429: return `The node is busy (429): ${error.message}`;
    case 503: return `The cluster cannot answer now (503): ${error.message}`;
    default: return `The node refused the request (${error.status}): ${error.message}`;
  }
}

function load() {
  try {
    const turns = JSON.parse(localStorage.getItem(HISTORY_SLOT) ?? '[]');
    // An answer cut short by a reload is kept as stopped.
    return Array.isArray(turns)
      ? turns.map((t) => (t.state === 'streaming' ? { ...t, state: 'stopped' } : t))
      : [];
  } catch {
    return [];
  }
}

function save(history) {
  try {
    localStorage.setItem(HISTORY_SLOT, JSON.stringify(history));
  } catch {
    // Storage full or disabled: the chat still works, it is just not kept.
  }
}
