// Turns a leased comparison into ready-to-attach DOM nodes, media downloaded up front.
import { renderMarkdown } from './markdown.js';
import { sleep } from './api.js';

async function fetchObjectUrl(url) {
  let lastError;
  for (let attempt = 0; attempt < 3; attempt += 1) {
    try {
      const resp = await fetch(url, { credentials: 'same-origin' });
      if (!resp.ok) throw new Error(`HTTP ${resp.status} for ${url}`);
      return URL.createObjectURL(await resp.blob());
    } catch (err) {
      lastError = err;
      await sleep(500 * 2 ** attempt);
    }
  }
  throw lastError;
}

function buildText(sample) {
  const el = document.createElement('div');
  el.className = 'rl-text rl-markdown';
  el.tabIndex = 0; // scrollable region reachable by keyboard
  if (!sample.text || !sample.text.trim()) {
    // An empty output is a real answer (the model said nothing); say so instead of a blank box.
    const empty = document.createElement('em');
    empty.className = 'rl-empty';
    empty.textContent = '(empty response)';
    el.appendChild(empty);
    return el;
  }
  el.innerHTML = renderMarkdown(sample.text); // markdown-it with html:false escapes raw HTML
  return el;
}

async function buildImage(sample, src) {
  const img = new Image();
  img.className = 'rl-image';
  img.alt = '';
  img.draggable = false;
  img.decoding = 'async';
  img.src = src;
  if (sample.width && sample.height) {
    img.width = sample.width;
    img.height = sample.height;
  }
  // Decode now so that showing the pair later costs nothing.
  try { await img.decode(); } catch (_) { /* a broken image still shows its box */ }
  return img;
}

function buildVideo(sample, src) {
  const video = document.createElement('video');
  video.className = 'rl-video';
  video.muted = true;
  video.loop = true;
  video.playsInline = true;
  video.preload = 'auto';
  // Attributes too, so the markup says what the player does.
  video.setAttribute('muted', '');
  video.setAttribute('loop', '');
  video.setAttribute('playsinline', '');
  video.setAttribute('preload', 'auto');
  video.disablePictureInPicture = true;
  video.src = src;
  video.load();
  return video;
}

// Returns the item's views, one per sample: {sample, el}. Never rejects: if a download
// fails the element falls back to the original URL and the browser fetches it itself.
export async function buildViews(item) {
  return Promise.all(item.payload.samples.map(async (sample) => {
    if (sample.modality === 'text' || !sample.url) return { sample, el: buildText(sample) };
    let src = sample.url;
    try {
      src = await fetchObjectUrl(sample.url);
      item.objectUrls.push(src);
    } catch (err) {
      console.warn('prefetch failed, using the direct URL', err);
    }
    if (sample.modality === 'video') return { sample, el: buildVideo(sample, src) };
    return { sample, el: await buildImage(sample, src) };
  }));
}

export function releaseViews(item) {
  for (const view of item.views || []) {
    if (view.el instanceof HTMLVideoElement) {
      view.el.pause();
      view.el.removeAttribute('src');
      view.el.load(); // drops the decoder and the reference to the blob
    }
  }
  for (const url of item.objectUrls) URL.revokeObjectURL(url);
  item.objectUrls = [];
  item.views = null;
}
