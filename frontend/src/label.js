// Rewardloop labeling page: shows one leased pair at a time, keeps two more prefetched,
// and submits judgments in the background. Contract: docs/API.md.
import { request, withRetry, uuid } from './api.js';
import { buildViews, releaseViews } from './media.js';
import { renderMarkdown } from './markdown.js';
import { VideoSync, syncScroll } from './sync.js';

const LOOKAHEAD = 3; // the pair on screen plus two prefetched
const POLL_MS = 10000;
const PROGRESS_EVERY = 20;
const DEFAULT_FPS = 24;

const KEYMAP = {
  ArrowLeft: 'left', 1: 'left',
  ArrowRight: 'right', 2: 'right',
  ArrowUp: 'tie', 3: 'tie',
  ArrowDown: 'both_bad', 4: 'both_bad',
  ' ': 'play', ',': 'frame-back', '.': 'frame-forward',
  s: 'skip', S: 'skip', u: 'undo', U: 'undo', // capitals: Caps Lock on
  r: 'check-again', R: 'check-again',
};
const PREVENT_DEFAULT = new Set(['ArrowLeft', 'ArrowRight', 'ArrowUp', 'ArrowDown', ' ']);
const REPEATABLE = new Set(['frame-back', 'frame-forward']);
const CHOICE_LABELS = { tie: 'Tie', both_bad: 'Both bad' };
const TYPING_INPUT_TYPES = new Set(['button', 'checkbox', 'radio', 'range', 'reset', 'submit', 'color', 'file', 'image']);

const $ = (id) => document.getElementById(id);

function readConfig() {
  const node = $('rl-config');
  if (!node) return null;
  try { return JSON.parse(node.textContent); } catch (_) { return null; }
}

function isTyping(target) {
  if (!(target instanceof Element)) return false;
  if (target.isContentEditable) return true;
  const tag = target.tagName;
  if (tag === 'TEXTAREA' || tag === 'SELECT') return true;
  return tag === 'INPUT' && !TYPING_INPUT_TYPES.has((target.type || 'text').toLowerCase());
}

class App {
  constructor(config) {
    this.config = config;
    this.api = config.api.endsWith('/') ? config.api : `${config.api}/`;
    this.options = { tie: true, both_bad: true, ...(config.options || {}) };
    this.aspects = Array.isArray(config.aspects) ? config.aspects : [];
    this.fps = Number(config.fps) > 0 ? Number(config.fps) : DEFAULT_FPS;

    this.queue = []; // prepared items, next first
    this.current = null;
    this.done = new Set(); // assignment ids judged or skipped in this page
    this.pending = new Set(); // in-flight judgment promises
    this.sessionCount = 0;
    this.submitted = 0; // successful submits, to pace progress refreshes
    // "N in total" = the server's count taken when nothing was in flight, plus this page's
    // changes since: +1 at once on a key press, -1 for a refused submit or an undo (also of a
    // judgment from an earlier session, which sessionCount cannot go below 0 for).
    this.totalBase = null;
    this.delta = 0;
    this.deltaAtBase = 0;
    this.countGen = 0; // bumped at every change of delta
    this.progress = null; // the last progress answer
    this.progressLoading = false;
    this.progressWanted = false;
    this.refilling = null;
    this.pollTimer = null;
    this.undoing = false;
    this.cleanup = [];
    this.videoSync = null;

    this.body = document.body;
    this.stage = $('rl-stage');
    this.prompt = $('rl-prompt');
    this.message = $('rl-message');
    this.panels = Array.from(this.stage.querySelectorAll('.rl-panel'));
    this.toastEl = $('rl-toast');
    this.countEl = $('rl-count');
    this.totalEl = $('rl-total');
    this.doneEls = {
      session: $('rl-done-session'),
      total: $('rl-done-total'),
      totalWrap: $('rl-done-total-wrap'),
      stuck: $('rl-done-stuck'),
    };
    this.instructions = $('rl-instructions');
    this.zoom = $('rl-zoom');
    this.zoomImg = $('rl-zoom-img');
    this.videoControls = $('rl-video-controls');

    // Read-only view of the queue for browser tests and debugging.
    const app = this;
    window.__rl = {
      get queue() { return app.queue.map((it) => it.id); },
      get prefetched() { return app.queue.filter((it) => it.isReady).map((it) => it.id); },
      get current() { return app.current ? app.current.id : null; },
      get done() { return [...app.done]; },
      get doneCount() { return app.sessionCount; },
      get total() { return app.total(); },
      get pending() { return app.pending.size; },
    };
  }

  start() {
    this.setupChrome();
    if (this.config.mode && this.config.mode !== 'pairwise') {
      this.setState('error', `This page only handles pairwise projects (mode: ${this.config.mode}).`);
      return;
    }
    this.setState('loading', 'Loading…');
    this.refill();
    this.loadProgress();
  }

  // ---- static UI -------------------------------------------------------------------------

  setupChrome() {
    for (const key of ['tie', 'both_bad']) {
      const enabled = Boolean(this.options[key]);
      for (const el of document.querySelectorAll(`[data-choice="${key}"], tr[data-option="${key}"]`)) {
        el.hidden = !enabled;
      }
    }
    $('rl-instructions-body').innerHTML = this.config.instructions
      ? renderMarkdown(this.config.instructions)
      : '<p>No instructions for this project.</p>';
    this.buildAspects();

    document.addEventListener('keydown', (e) => this.onKey(e));
    document.addEventListener('click', (e) => this.onClick(e));
    this.instructions.addEventListener('click', (e) => {
      if (e.target === this.instructions) this.toggleInstructions(false);
    });
    this.setupZoom();
    window.addEventListener('beforeunload', (e) => {
      if (this.pending.size) {
        e.preventDefault();
        e.returnValue = '';
      }
    });
  }

  buildAspects() {
    const box = $('rl-aspects');
    if (!this.aspects.length) return;
    box.hidden = false;
    const values = [['left', 'A'], ['tie', '='], ['right', 'B']].filter(([v]) => v !== 'tie' || this.options.tie);
    for (const aspect of this.aspects) {
      const row = document.createElement('div');
      row.className = 'rl-aspect';
      row.dataset.aspect = aspect.key;
      row.setAttribute('role', 'group');
      const label = document.createElement('span');
      label.className = 'rl-aspect-label';
      label.textContent = aspect.label || aspect.key;
      row.setAttribute('aria-label', label.textContent);
      row.append(label);
      for (const [value, text] of values) {
        const btn = document.createElement('button');
        btn.type = 'button';
        btn.className = 'rl-button rl-small rl-aspect-choice';
        btn.dataset.aspectValue = value;
        btn.textContent = text;
        btn.title = `${label.textContent}: ${value === 'tie' ? 'tie' : `${text} is better`}`;
        btn.setAttribute('aria-pressed', 'false');
        row.append(btn);
      }
      box.append(row);
    }
  }

  renderAspects() {
    const chosen = this.current ? this.current.aspects : {};
    for (const btn of document.querySelectorAll('.rl-aspect-choice')) {
      const key = btn.closest('.rl-aspect').dataset.aspect;
      btn.setAttribute('aria-pressed', chosen[key] === btn.dataset.aspectValue ? 'true' : 'false');
    }
  }

  setState(state, text) {
    this.body.dataset.state = state;
    if (text !== undefined) this.message.textContent = text;
  }

  toast(text, kind = 'error', ms = 5000) {
    this.toastEl.textContent = text;
    this.toastEl.dataset.kind = kind;
    this.toastEl.classList.add('is-visible');
    clearTimeout(this.toastTimer);
    this.toastTimer = setTimeout(() => this.toastEl.classList.remove('is-visible'), ms);
  }

  total() {
    return this.totalBase === null ? null : this.totalBase + (this.delta - this.deltaAtBase);
  }

  // Every judgment made or taken back on this page goes through here.
  countChanged(step) {
    this.sessionCount = Math.max(0, this.sessionCount + step);
    this.delta += step;
    this.countGen += 1;
    this.renderCount();
  }

  renderCount() {
    const n = this.sessionCount;
    const total = this.total();
    this.countEl.textContent = `${n} judged this session`;
    this.totalEl.textContent = total === null ? '' : ` · ${total} in total`;
    this.renderDone();
  }

  renderDone() {
    const total = this.total();
    this.doneEls.session.textContent = String(this.sessionCount);
    this.doneEls.totalWrap.hidden = total === null;
    this.doneEls.total.textContent = total === null ? '' : String(total);
    const project = this.progress && this.progress.project;
    const stuck = project && Number.isFinite(project.stuck) ? project.stuck : 0;
    // Only managers can act on it (reopen, add annotators, change overlap).
    const manager = this.config.role === 'manager';
    this.doneEls.stuck.hidden = !(manager && stuck > 0);
    this.doneEls.stuck.textContent = manager && stuck > 0
      ? `${stuck} ${stuck === 1 ? 'comparison was' : 'comparisons were'} skipped by every active annotator`
        + ' and will not be served again until more annotators join.'
      : '';
  }

  // The server's count is taken only while no judgment or undo is in flight, and kept only if
  // none started meanwhile: then it holds exactly the judgments this page has counted.
  async loadProgress() {
    if (this.progressLoading || this.pending.size || this.undoing) {
      this.progressWanted = true;
      return;
    }
    this.progressWanted = false;
    this.progressLoading = true;
    const gen = this.countGen;
    const delta = this.delta;
    let data = null;
    try {
      data = await request('GET', `${this.api}progress/`);
    } catch (_) {
      // Progress is decoration; the queue keeps working without it.
    }
    this.progressLoading = false;
    if (data) this.progress = data;
    const judged = data && data.me ? data.me.judged : undefined;
    if (Number.isFinite(judged)) {
      if (gen === this.countGen) {
        this.totalBase = judged;
        this.deltaAtBase = delta;
      } else {
        this.progressWanted = true;
      }
    }
    this.renderCount();
    this.progressSettled();
  }

  // Runs a refresh that had to wait for in-flight work.
  progressSettled() {
    if (this.progressWanted && !this.progressLoading && !this.pending.size && !this.undoing) this.loadProgress();
  }

  // ---- queue -----------------------------------------------------------------------------

  knows(id) {
    return this.done.has(id) || (this.current && this.current.id === id) || this.queue.some((it) => it.id === id);
  }

  prepare(payload) {
    const item = {
      id: payload.assignment,
      payload,
      aspects: {},
      objectUrls: [],
      views: null,
      isReady: false,
      shownAt: 0,
    };
    item.ready = buildViews(item).then((views) => {
      item.views = views;
      item.isReady = true;
    });
    return item;
  }

  addItems(items) {
    if (!Array.isArray(items)) return;
    for (const payload of items) {
      if (payload && payload.assignment != null && !this.knows(payload.assignment)) {
        this.queue.push(this.prepare(payload));
      }
    }
    this.pump();
  }

  refill() {
    if (this.refilling) return this.refilling;
    clearTimeout(this.pollTimer);
    this.pollTimer = null;
    this.refilling = (async () => {
      try {
        const data = await withRetry(() => request('GET', `${this.api}next/?n=${LOOKAHEAD}`), {
          onRetry: () => this.toast('Connection problem, retrying…', 'warn'),
        });
        this.refilling = null;
        this.addItems(data && data.items);
      } catch (err) {
        this.refilling = null;
        if (!this.current && !this.queue.length) {
          this.setState('error', err.message);
          return;
        }
        this.toast(err.message);
      }
      this.pump();
    })();
    return this.refilling;
  }

  // Puts the next ready item on screen when the stage is free.
  async pump() {
    if (this.current || this.pumping) return;
    if (!this.queue.length) {
      if (this.body.dataset.state === 'error') return;
      // An answer still on its way may bring more work (judgment responses carry `next`).
      if (this.refilling || this.pending.size) {
        this.setState('loading', 'Loading…');
        return;
      }
      if (this.body.dataset.state !== 'empty') {
        this.setState('empty', 'No more comparisons right now');
        this.renderDone();
        this.loadProgress(); // the end screen shows the server's numbers (and stuck work)
      }
      if (!this.pollTimer) this.pollTimer = setTimeout(() => { this.pollTimer = null; this.refill(); }, POLL_MS);
      return;
    }
    const item = this.queue[0];
    if (!item.isReady) {
      this.setState('loading', 'Loading…');
      this.pumping = true;
      await item.ready;
      this.pumping = false;
      if (this.current) return;
      if (this.queue[0] !== item) { this.pump(); return; }
    }
    this.queue.shift();
    this.show(item);
  }

  show(item) {
    clearTimeout(this.pollTimer);
    this.pollTimer = null;
    this.current = item;
    const { samples, prompt } = item.payload;
    this.stage.dataset.assignment = String(item.id);
    this.prompt.textContent = (prompt && prompt.text) || '';
    this.prompt.scrollTop = 0;
    this.panels.forEach((panel, i) => {
      const view = item.views[i];
      panel.dataset.sample = view ? String(view.sample.id) : '';
      panel.dataset.modality = view ? view.sample.modality : '';
      panel.querySelector('.rl-media').replaceChildren(...(view ? [view.el] : []));
    });
    this.bindModality(item);
    this.renderAspects();
    this.setState('ready');
    item.shownAt = performance.now();
  }

  bindModality(item) {
    const els = item.views.map((v) => v.el);
    const videos = els.filter((el) => el instanceof HTMLVideoElement);
    if (videos.length) {
      const [left, right] = videos.length === 2 ? videos : [videos[0], videos[0]];
      for (const v of videos) v.currentTime = 0;
      // Frame steps use the clip's own frame rate when the server knows it.
      const sampleFps = Math.max(0, ...item.payload.samples.map((s) => Number(s.fps) || 0));
      this.videoSync = new VideoSync(left, right, {
        fps: sampleFps > 0 ? sampleFps : this.fps, readout: $('rl-time'), seek: $('rl-seek'), playButton: $('rl-play'),
      });
      this.videoSync.play();
      this.videoControls.dataset.active = 'true';
    } else {
      this.videoControls.dataset.active = 'false';
    }
    const texts = els.filter((el) => el.classList.contains('rl-text'));
    for (const t of texts) t.scrollTop = 0;
    if (texts.length === 2) this.cleanup.push(syncScroll(texts[0], texts[1]));
  }

  // Takes the current item off the stage. release=false keeps its media for a later show.
  unshow({ release }) {
    const item = this.current;
    if (!item) return null;
    if (this.videoSync) { this.videoSync.destroy(); this.videoSync = null; }
    for (const fn of this.cleanup.splice(0)) fn();
    this.closeZoom();
    for (const panel of this.panels) panel.querySelector('.rl-media').replaceChildren();
    delete this.stage.dataset.assignment;
    this.prompt.textContent = '';
    this.current = null;
    if (release) releaseViews(item);
    return item;
  }

  // ---- actions ---------------------------------------------------------------------------

  choose(choice) {
    const item = this.current;
    if (!item || this.undoing || this.body.dataset.state !== 'ready') return;
    if ((choice === 'tie' || choice === 'both_bad') && !this.options[choice]) {
      this.toast(`"${CHOICE_LABELS[choice]}" is turned off for this project`, 'warn', 2500);
      return;
    }
    const body = {
      assignment: item.id,
      choice,
      aspects: { ...item.aspects },
      time_spent_ms: Math.round(performance.now() - item.shownAt),
      idempotency_key: uuid(),
    };
    this.done.add(item.id);
    this.countChanged(1);
    this.unshow({ release: true });
    this.submit(body);
    this.pump();
  }

  submit(body) {
    const url = `${this.api}judgments/?next=${LOOKAHEAD}`;
    const promise = withRetry(() => request('POST', url, body), {
      onRetry: () => this.toast('Saving failed, retrying…', 'warn'),
    }).then((data) => {
      this.submitted += 1;
      this.pending.delete(promise);
      // Now and then, pick up judgments made elsewhere (another tab, the API).
      if (this.submitted % PROGRESS_EVERY === 0) this.progressWanted = true;
      this.progressSettled();
      this.addItems(data && data.next && data.next.items);
    }, (err) => {
      this.pending.delete(promise);
      if (err.code !== 'already_judged') {
        this.countChanged(-1);
      }
      this.progressSettled();
      this.toast(err.message);
      // No next payload came back: ask for work directly.
      if (this.queue.length < LOOKAHEAD - 1) this.refill();
      else this.pump();
    });
    this.pending.add(promise);
    return promise;
  }

  skip() {
    const item = this.current;
    if (!item || this.undoing || this.body.dataset.state !== 'ready') return;
    this.done.add(item.id);
    this.unshow({ release: true });
    const promise = withRetry(() => request('POST', `${this.api}skip/`, { assignment: item.id }))
      .catch((err) => this.toast(err.message))
      .then(() => {
        this.pending.delete(promise);
        this.progressSettled();
        // Only now: asked earlier, the server would still hand back the skipped lease.
        this.refill();
      });
    this.pending.add(promise);
    this.pump();
  }

  async undo() {
    if (this.undoing) return;
    this.undoing = true;
    this.countGen += 1; // a progress answer on its way may or may not include this undo
    try {
      // Let judgments still in flight land first, so the server undoes the one the user means.
      await Promise.allSettled([...this.pending]);
      const data = await request('POST', `${this.api}undo/`, {});
      const payload = data && Array.isArray(data.items) ? data.items[0] : null;
      if (!payload) {
        this.toast('Nothing to undo', 'warn', 2500);
        return;
      }
      this.done.delete(payload.assignment);
      const stale = this.queue.findIndex((it) => it.id === payload.assignment);
      if (stale >= 0) releaseViews(this.queue.splice(stale, 1)[0]);
      const item = this.prepare(payload);
      const previous = this.unshow({ release: false });
      if (previous) this.queue.unshift(previous);
      this.queue.unshift(item);
      this.countChanged(-1);
      this.toast('Last judgment undone', 'info', 2000);
    } catch (err) {
      this.toast(err.message);
    } finally {
      this.undoing = false;
      this.progressSettled();
      this.pump();
    }
  }

  checkAgain() {
    if (this.body.dataset.state !== 'empty') return;
    this.setState('loading', 'Looking for new comparisons…');
    this.refill();
    this.loadProgress();
  }

  // ---- video -----------------------------------------------------------------------------

  videoAction(action) {
    const sync = this.videoSync;
    if (!sync) return;
    if (action === 'play') sync.toggle();
    else if (action === 'frame-back') sync.step(-1);
    else if (action === 'frame-forward') sync.step(1);
  }

  // ---- overlays --------------------------------------------------------------------------

  toggleInstructions(open = this.instructions.hidden) {
    this.instructions.hidden = !open;
    if (open) this.instructions.querySelector('[data-action="help-close"]').focus();
    else if (document.activeElement && this.instructions.contains(document.activeElement)) {
      document.activeElement.blur();
    }
  }

  setupZoom() {
    let drag = null;
    this.stage.addEventListener('click', (e) => {
      const img = e.target instanceof HTMLImageElement && e.target.closest('.rl-panel') ? e.target : null;
      if (img) this.openZoom(img, e);
    });
    this.zoom.addEventListener('pointerdown', (e) => {
      drag = { x: e.clientX, y: e.clientY, left: this.zoom.scrollLeft, top: this.zoom.scrollTop, moved: false };
      this.zoom.setPointerCapture(e.pointerId);
      e.preventDefault();
    });
    this.zoom.addEventListener('pointermove', (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x;
      const dy = e.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 4) drag.moved = true;
      this.zoom.scrollLeft = drag.left - dx;
      this.zoom.scrollTop = drag.top - dy;
    });
    this.zoom.addEventListener('pointerup', () => {
      const wasClick = drag && !drag.moved;
      drag = null;
      if (wasClick) this.closeZoom();
    });
    this.zoom.addEventListener('pointercancel', () => { drag = null; });
  }

  openZoom(img, event) {
    const natW = img.naturalWidth;
    const natH = img.naturalHeight;
    if (!natW || !natH) return;
    const rect = img.getBoundingClientRect();
    const fit = Math.min(rect.width / natW, rect.height / natH);
    const shownW = natW * fit;
    const shownH = natH * fit;
    const fx = Math.min(Math.max((event.clientX - rect.left - (rect.width - shownW) / 2) / shownW, 0), 1);
    const fy = Math.min(Math.max((event.clientY - rect.top - (rect.height - shownH) / 2) / shownH, 0), 1);
    this.zoomImg.src = img.currentSrc || img.src;
    // Exactly the file's pixels (one per CSS pixel): never blown up, never cut; a bigger image
    // than the screen scrolls and pans.
    this.zoomImg.style.width = `${natW}px`;
    this.zoomImg.style.height = `${natH}px`;
    this.zoom.hidden = false;
    // Centre the clicked point.
    this.zoom.scrollLeft = fx * this.zoom.scrollWidth - this.zoom.clientWidth / 2;
    this.zoom.scrollTop = fy * this.zoom.scrollHeight - this.zoom.clientHeight / 2;
  }

  closeZoom() {
    if (this.zoom.hidden) return;
    this.zoom.hidden = true;
    this.zoomImg.removeAttribute('src');
  }

  overlayOpen() {
    return !this.instructions.hidden || !this.zoom.hidden;
  }

  // ---- input -----------------------------------------------------------------------------

  run(action) {
    switch (action) {
      case 'left': case 'right': case 'tie': case 'both_bad': this.choose(action); break;
      case 'skip': this.skip(); break;
      case 'undo': this.undo(); break;
      case 'help': this.toggleInstructions(); break;
      case 'help-close': this.toggleInstructions(false); break;
      case 'check-again': this.checkAgain(); break;
      case 'play': case 'frame-back': case 'frame-forward': this.videoAction(action); break;
      default: break;
    }
  }

  onKey(e) {
    if (e.defaultPrevented || e.isComposing || isTyping(e.target)) return;
    const { key } = e;
    if (key === 'Escape') {
      if (!this.zoom.hidden) this.closeZoom();
      else if (!this.instructions.hidden) this.toggleInstructions(false);
      return;
    }
    if ((e.ctrlKey || e.metaKey) && !e.altKey && !e.shiftKey && (key === 'z' || key === 'Z')) {
      e.preventDefault();
      if (!e.repeat && !this.overlayOpen()) this.undo();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (key === '?') {
      e.preventDefault();
      if (!this.zoom.hidden) this.closeZoom();
      this.toggleInstructions();
      return;
    }
    if (e.shiftKey) return;
    const action = KEYMAP[key];
    if (!action || this.overlayOpen()) return;
    // Also stops Space from activating a focused button (a second, unintended choice).
    if (PREVENT_DEFAULT.has(key)) e.preventDefault();
    if (e.repeat && !REPEATABLE.has(action)) return; // a held arrow must not judge a whole queue
    this.run(action);
  }

  onClick(e) {
    const target = e.target instanceof Element ? e.target.closest('button') : null;
    if (!target || !document.getElementById('rl-app').contains(target)) return;
    if (target.dataset.aspectValue) {
      this.setAspect(target.closest('.rl-aspect').dataset.aspect, target.dataset.aspectValue);
    } else if (target.dataset.choice) {
      this.run(target.dataset.choice);
    } else if (target.dataset.action) {
      this.run(target.dataset.action);
    } else {
      return;
    }
    // A mouse click leaves focus on the button, where Space/Enter would press it again.
    if (e.detail > 0) target.blur();
  }

  setAspect(key, value) {
    if (!this.current) return;
    const aspects = this.current.aspects;
    if (aspects[key] === value) delete aspects[key];
    else aspects[key] = value;
    this.renderAspects();
  }
}

function main() {
  const config = readConfig();
  if (!config || !config.api) {
    document.body.dataset.state = 'error';
    const msg = document.getElementById('rl-message');
    if (msg) msg.textContent = 'Page configuration is missing.';
    return;
  }
  new App(config).start();
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', main);
else main();
