// The page's entry point: asks for the API key when the node wants one, fills the model picker,
// follows /v1/cluster/events, and marks the moment the page is usable ("exo-interactive").

import { ApiError, apiKey, events, getJson, keyRequired, request, setApiKey } from './api.js';
import { Chat } from './chat.js';
import { renderCluster } from './cluster.js';

const $ = (id) => document.getElementById(id);

let watch = null;
let modelsShown = '';
let modelsLoaded = false;
let interactive = false;

const chat = new Chat({ onRefused: () => askForKey('The node refused the key; enter it again.') });

function status(text, tone) {
  const pill = $('status');
  pill.textContent = text;
  pill.dataset.tone = tone;
}

async function loadModels() {
  const list = await getJson('/v1/models');
  const ids = list.data.map((m) => m.id);
  modelsShown = ids.join('\n');
  modelsLoaded = true;
  chat.setModels(ids);
}

/** Follows the cluster's events until the key changes; reconnects after a pause if cut. */
async function followCluster(signal) {
  let pause = 1000;
  while (!signal.aborted) {
    try {
      const response = await request('/v1/cluster/events', { signal });
      for await (const { event, data } of events(response)) {
        if (event !== 'cluster') continue;
        const view = JSON.parse(data);
        renderCluster(view);
        status(view.ready ? 'ready' : view.plan ? 'loading' : 'waiting', view.ready ? 'good' : view.plan ? 'busy' : 'bad');
        pause = 1000;
        const offered = view.plan?.model;
        if (offered && !modelsShown.split('\n').includes(offered)) await loadModels();
        markInteractive();
      }
    } catch (error) {
      if (signal.aborted || error.name === 'AbortError') return;
      if (error instanceof ApiError && error.status === 401) {
        askForKey('The node refused the key; enter it again.');
        return;
      }
      status('disconnected', 'bad');
      $('banner').dataset.tone = 'bad';
      $('banner').textContent = `Lost the node (${error.message}); reconnecting…`;
    }
    await new Promise((resolve) => setTimeout(resolve, pause));
    pause = Math.min(pause * 2, 10000);
  }
}

function markInteractive() {
  if (interactive || !modelsLoaded) return;
  interactive = true;
  document.body.dataset.ready = 'true';
  performance.mark('exo-interactive');
}

async function start() {
  watch?.abort();
  watch = new AbortController();
  $('key-button').hidden = !keyRequired;
  try {
    await loadModels();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      askForKey('The node refused the key; enter it again.');
      return;
    }
    status('disconnected', 'bad');
  }
  followCluster(watch.signal);
}

function askForKey(problem = '') {
  watch?.abort();
  status('key needed', 'bad');
  const error = $('key-error');
  error.hidden = !problem;
  error.textContent = problem;
  const dialog = $('key-dialog');
  if (!dialog.open) dialog.showModal();
  $('key-input').focus();
}

$('key-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const key = $('key-input').value.trim();
  if (!key) return;
  setApiKey(key);
  try {
    await request('/v1/models');
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      setApiKey('');
      askForKey(`That key was refused (401): ${error.message}`);
      return;
    }
  }
  $('key-input').value = '';
  $('key-dialog').close();
  start();
});
$('key-button').addEventListener('click', () => askForKey());

if (keyRequired && !apiKey()) askForKey();
else start();
