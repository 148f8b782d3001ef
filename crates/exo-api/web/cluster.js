// The cluster view: a banner with the cluster's state (and why it waits), the plan drawn as a
// ring of stages, every device with its state, memory and figures, the measured links, and
// peers that were seen but could not join. It redraws from each ClusterView the node sends.

import { bytes, el } from './api.js';

const SVG = 'http://www.w3.org/2000/svg';
const $ = (id) => document.getElementById(id);

// Colours of nodes, told apart at a glance: the plan's stages first, in ring order.
const PALETTE = ['#3b82f6', '#f59e0b', '#10b981', '#ef4444', '#8b5cf6', '#06b6d4', '#ec4899', '#84cc16'];
let colours = new Map();

/** Redraws the cluster panel from `view` (a ClusterView). */
export function renderCluster(view) {
  const names = new Map(view.nodes.map((n) => [n.id, n.name || short(n.id)]));
  const order = [...(view.plan?.stages ?? []).flatMap((s) => [s.node, ...(s.group ?? [])]), ...view.nodes.map((n) => n.id)];
  colours = new Map();
  for (const id of order) if (!colours.has(id)) colours.set(id, PALETTE[colours.size % PALETTE.length]);
  banner(view);
  ring(view, names);
  // Devices in ring order, then the others (this node first among them, as the node sends).
  const rank = (node) => {
    const at = view.plan?.stages.findIndex((s) => s.node === node.id || s.group?.includes(node.id)) ?? -1;
    return at < 0 ? Infinity : at;
  };
  const devices = [...view.nodes].sort((a, b) => rank(a) - rank(b));
  $('nodes').replaceChildren(...devices.map((node) => device(node, view.plan)));
  links(view.links, names);
  problems(view.problems ?? []);
  const explanation = view.plan?.explanation ?? [];
  $('explain').hidden = explanation.length === 0;
  $('explanation').replaceChildren(...explanation.map((line) => el('li', {}, line)));
}

/** The short form of a node id, as people compare them. */
export function short(id) {
  return id.length > 10 ? `…${id.slice(-6)}` : id;
}

/** A node's colour, the same in the ring and the device list. */
function colour(id) {
  return colours.get(id) ?? '#888';
}

function banner(view) {
  const box = $('banner');
  box.dataset.tone = view.ready ? 'good' : view.plan ? 'busy' : 'bad';
  box.replaceChildren(
    el('strong', {}, view.ready ? 'Ready' : view.plan ? 'Getting ready' : 'Waiting'),
    ' ',
    view.ready && view.plan
      ? `${view.plan.model} on ${view.plan.stages.length} stage${view.plan.stages.length === 1 ? '' : 's'}`
      : view.status.replace(/^(waiting|not ready): /, ''),
  );
}

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text != null) node.textContent = text;
  return node;
}

// The ring's centre in the drawing (440 x 320: room for labels on both sides).
const CX = 220;
const CY = 160;

/** A point on the circle of radius `r`, `turn` (0 to 1) clockwise from the top. */
function point(r, turn) {
  const angle = turn * 2 * Math.PI - Math.PI / 2;
  return [CX + r * Math.cos(angle), CY + r * Math.sin(angle)];
}

function arc(r, from, to) {
  const [x0, y0] = point(r, from);
  const [x1, y1] = point(r, to);
  const large = to - from > 0.5 ? 1 : 0;
  return `M ${x0.toFixed(2)} ${y0.toFixed(2)} A ${r} ${r} 0 ${large} 1 ${x1.toFixed(2)} ${y1.toFixed(2)}`;
}

/** The plan as a ring: one arc per stage, as long as its share of the layers. */
function ring(view, names) {
  const root = $('ring');
  const parts = [];
  const plan = view.plan;
  const radius = 104;
  const layers = plan?.stages.at(-1)?.layers_end ?? 0;
  if (!plan || layers === 0) {
    parts.push(svg('circle', { cx: CX, cy: CY, r: radius, class: 'ring-empty' }));
    parts.push(svg('text', { x: CX, y: CY - 4, class: 'ring-title' }, 'no plan yet'));
    parts.push(svg('text', { x: CX, y: CY + 16, class: 'ring-sub' }, `${view.nodes.filter((n) => n.state !== 'gone').length} device(s)`));
    root.replaceChildren(...parts);
    return;
  }
  const gap = plan.stages.length > 1 ? 0.006 : 0;
  plan.stages.forEach((stage, index) => {
    const from = stage.layers_start / layers;
    const to = plan.stages.length === 1 ? 0.9999 : stage.layers_end / layers;
    const members = stage.group?.length ? stage.group : [stage.node];
    const path = svg('path', {
      d: arc(radius, from + gap, to - gap),
      class: 'ring-stage',
      stroke: colour(stage.node),
      'data-node': stage.node,
    });
    path.append(svg('title', {}, `stage ${index + 1}: layers ${stage.layers_start}–${stage.layers_end - 1} on ${members.map((m) => names.get(m) ?? short(m)).join(' + ')}`));
    parts.push(path);
    const middle = (from + to) / 2;
    const [x, y] = point(radius + 28, middle);
    const anchor = Math.abs(x - CX) < 20 ? 'middle' : x > CX ? 'start' : 'end';
    const label = svg('text', { x: x.toFixed(1), y: y.toFixed(1), class: 'ring-label', 'text-anchor': anchor });
    const who = members.map((m) => names.get(m) ?? short(m)).join(' + ');
    label.append(svg('tspan', { x: x.toFixed(1), dy: '-0.2em', class: 'ring-node' }, who));
    label.append(svg('tspan', { x: x.toFixed(1), dy: '1.2em' }, `layers ${stage.layers_start}–${stage.layers_end - 1}`));
    if (members.length > 1) label.append(svg('tspan', { x: x.toFixed(1), dy: '1.2em' }, `tensor parallel ×${members.length}`));
    parts.push(label);
  });
  parts.push(svg('text', { x: CX, y: CY - 10, class: 'ring-title' }, plan.model));
  parts.push(svg('text', { x: CX, y: CY + 10, class: 'ring-sub' }, `${layers} layers · ${plan.stages.length} stage${plan.stages.length === 1 ? '' : 's'}`));
  const measured = plan.stages.map((s) => s.tokens_per_s).filter((t) => t > 0);
  const rate = measured.length
    ? `${Math.min(...measured).toFixed(1)} tokens/s now`
    : plan.predicted_decode_tokens_per_s
      ? `~${plan.predicted_decode_tokens_per_s.toFixed(0)} tokens/s predicted`
      : '';
  if (rate) parts.push(svg('text', { x: CX, y: CY + 28, class: 'ring-sub' }, rate));
  root.replaceChildren(...parts);
}

const STATE_WORDS = {
  joining: 'joining',
  loading: 'loading',
  fetching: 'fetching its layers',
  ready: 'ready',
  idle: 'idle: not in the plan',
  waiting: 'waiting',
  observer: 'gateway',
  gone: 'gone',
};

function device(node, plan) {
  const stageIndex = plan?.stages.findIndex((s) => s.node === node.id || s.group?.includes(node.id)) ?? -1;
  const stage = stageIndex >= 0 ? plan.stages[stageIndex] : null;
  let state = STATE_WORDS[node.state] ?? node.state;
  if (node.state === 'loading' && node.progress != null) state = `loading ${Math.round(node.progress * 100)}%`;
  if (node.state === 'fetching' && node.progress != null) state = `fetching ${Math.round(node.progress * 100)}%`;
  const swatch = el('span', { class: 'swatch' });
  swatch.style.setProperty('background', colour(node.id));
  const head = el('div', { class: 'node-head' },
    swatch,
    el('strong', {}, node.name || short(node.id)),
    el('span', { class: 'muted', title: node.id }, short(node.id)),
    node.is_self ? el('span', { class: 'muted' }, '(this node)') : null,
    el('span', { class: 'badge', 'data-state': node.state }, state));
  const facts = [node.os, node.device, node.cores ? `${node.cores} cores` : '', node.backend && node.backend !== 'none' ? node.backend : '']
    .filter(Boolean).join(' · ');
  const parts = [head];
  if (facts) parts.push(el('div', { class: 'muted' }, facts));
  if (node.state === 'loading' && node.progress != null) {
    parts.push(el('progress', { max: 1, value: node.progress.toFixed(3), 'aria-label': 'layers loaded' }));
  }
  if (node.state === 'fetching' && node.fetch) {
    const f = node.fetch;
    parts.push(el('progress', { max: 1, value: (node.progress ?? 0).toFixed(3), 'aria-label': 'layers fetched from peers' }));
    const eta = f.eta_s != null ? ` · ${Math.ceil(f.eta_s)} s left` : '';
    parts.push(el('div', { class: 'muted' },
      `from peers: ${bytes(f.received_bytes)} of ${bytes(f.total_bytes)} · ${bytes(f.bytes_per_s)}/s${eta}`));
  }
  if (node.role !== 'observer' && node.offered_memory_bytes) {
    const used = node.used_memory_bytes;
    parts.push(el('div', { class: 'memory' },
      el('meter', { min: 0, max: node.offered_memory_bytes, value: Math.min(used ?? 0, node.offered_memory_bytes), 'aria-label': 'memory used of offered' }),
      el('span', { class: 'muted' },
        `${used != null ? `${bytes(used)} used of ` : ''}${bytes(node.offered_memory_bytes)} offered`
        + (node.memory_bytes ? ` (${bytes(node.memory_bytes)} total)` : '')
        + (node.weight_bytes ? ` · weights ${bytes(node.weight_bytes)}` : ''))));
  }
  if (stage) {
    const figures = [`stage ${stageIndex + 1}: layers ${stage.layers_start}–${stage.layers_end - 1}`];
    if (stage.embeds) figures.push('embeds');
    if (stage.has_head) figures.push('samples');
    if (stage.step_ms != null) figures.push(`step ${stage.step_ms.toFixed(1)} ms`);
    if (stage.tokens_per_s != null) figures.push(`${stage.tokens_per_s.toFixed(1)} tokens/s`);
    if (stage.requests != null) figures.push(`${stage.requests} request${stage.requests === 1 ? '' : 's'} in flight`);
    parts.push(el('div', { class: 'stage' }, figures.join(' · ')));
  }
  return el('li', { class: 'node', 'data-id': node.id, 'data-state': node.state }, ...parts);
}

function links(list, names) {
  $('links-box').hidden = list.length === 0;
  const rows = list.map((link) => el('tr', {},
    el('td', {}, names.get(link.from) ?? short(link.from)),
    el('td', {}, names.get(link.to) ?? short(link.to)),
    el('td', {}, link.latency_ms == null ? 'measuring' : `${link.latency_ms.toFixed(2)} ms`),
    el('td', {}, link.bandwidth_bytes_per_s == null ? 'measuring' : `${bytes(link.bandwidth_bytes_per_s)}/s`)));
  $('links').tBodies[0].replaceChildren(...rows);
}

function problems(list) {
  $('problems-box').hidden = list.length === 0;
  $('problems').replaceChildren(...list.map((p) => el('li', {},
    el('strong', {}, p.address ?? (p.peer ? short(p.peer) : 'a peer')), `: ${p.problem}`)));
}
