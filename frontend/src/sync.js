// Keeps the two players of a video pair, or the two scrolling text panels, together.

const DRIFT_LIMIT = 0.1; // seconds the right player may lag or lead before it is corrected
const SEEK_EPSILON = 0.02; // below this two positions count as equal (stops seek echo loops)
const LENGTH_TOLERANCE = 0.25; // videos longer/shorter than this are not time-locked

function playQuietly(video) {
  const p = video.play();
  if (p && typeof p.catch === 'function') p.catch(() => {});
}

function formatTime(t) {
  if (!Number.isFinite(t) || t < 0) t = 0;
  const m = Math.floor(t / 60);
  const s = t - m * 60;
  return `${m}:${s.toFixed(2).padStart(5, '0')}`;
}

export class VideoSync {
  // left is the reference clock; right follows it.
  constructor(left, right, { fps = 24, readout = null, seek = null, playButton = null } = {}) {
    this.left = left;
    this.right = right;
    this.fps = fps > 0 ? fps : 24;
    this.readout = readout;
    this.seekInput = seek;
    this.playButton = playButton;
    this.listeners = [];
    this.scrubbing = false;

    // Mirror what happens to either player onto the other. Each handler only acts when the
    // other player is in a different state, so the echo of our own call is a no-op.
    for (const [src, dst] of [[left, right], [right, left]]) {
      this.on(src, 'play', () => { if (dst.paused) playQuietly(dst); this.render(); });
      this.on(src, 'pause', () => { if (!dst.paused) dst.pause(); this.render(); });
      this.on(src, 'seeking', () => {
        if (!this.sameLength()) return; // a shorter clip looping must not rewind the longer one
        if (Math.abs(dst.currentTime - src.currentTime) > SEEK_EPSILON) {
          dst.currentTime = this.clamp(dst, src.currentTime);
        }
      });
    }
    for (const type of ['timeupdate', 'seeked', 'loadedmetadata', 'durationchange']) {
      this.on(left, type, () => this.render());
    }
    if (seek) {
      this.on(seek, 'pointerdown', () => { this.scrubbing = true; });
      this.on(seek, 'pointerup', () => { this.scrubbing = false; });
      this.on(seek, 'input', () => {
        const d = this.duration();
        if (d > 0) this.seekBoth((Number(seek.value) / Number(seek.max)) * d);
      });
      // Leave keyboard focus to the page so arrows keep judging rather than nudging the slider.
      this.on(seek, 'change', () => { this.scrubbing = false; seek.blur(); });
    }
    this.timer = setInterval(() => this.correctDrift(), 250);
    this.render();
  }

  on(target, type, fn) {
    target.addEventListener(type, fn);
    this.listeners.push([target, type, fn]);
  }

  destroy() {
    clearInterval(this.timer);
    for (const [target, type, fn] of this.listeners) target.removeEventListener(type, fn);
    this.listeners = [];
    this.left.pause();
    this.right.pause();
  }

  duration() {
    const d = this.left.duration;
    return Number.isFinite(d) ? d : 0;
  }

  sameLength() {
    const a = this.left.duration;
    const b = this.right.duration;
    if (!Number.isFinite(a) || !Number.isFinite(b)) return true;
    return Math.abs(a - b) <= LENGTH_TOLERANCE;
  }

  clamp(video, t) {
    const d = video.duration;
    if (Number.isFinite(d) && d > 0) return Math.min(Math.max(t, 0), d);
    return Math.max(t, 0);
  }

  get paused() {
    return this.left.paused && this.right.paused;
  }

  play() {
    playQuietly(this.left);
    playQuietly(this.right);
    this.render();
  }

  pause() {
    this.left.pause();
    this.right.pause();
    this.render();
  }

  toggle() {
    if (this.left.paused || this.right.paused) this.play();
    else this.pause();
  }

  seekBoth(t) {
    this.left.currentTime = this.clamp(this.left, t);
    this.right.currentTime = this.clamp(this.right, t);
    this.render();
  }

  // Lands in the middle of the neighbouring frame so rounding never shows the same frame twice.
  step(direction) {
    this.pause();
    const frame = 1 / this.fps;
    const index = Math.floor(this.left.currentTime * this.fps + 1e-3);
    let t = (index + direction + 0.5) * frame;
    const d = this.duration();
    if (d > 0) t = Math.min(t, Math.max(d - frame / 2, 0));
    this.seekBoth(Math.max(t, frame / 2));
  }

  correctDrift() {
    const { left, right } = this;
    if (left.seeking || right.seeking || left.readyState < 2 || right.readyState < 2) return;
    if (left.paused !== right.paused) {
      // One player stalled or was paused behind our back: follow the reference.
      if (left.paused) right.pause();
      else playQuietly(right);
    }
    if (!this.sameLength()) return;
    if (Math.abs(right.currentTime - left.currentTime) > DRIFT_LIMIT) {
      right.currentTime = this.clamp(right, left.currentTime);
    }
  }

  render() {
    const t = this.left.currentTime;
    const d = this.duration();
    if (this.readout) this.readout.textContent = `${formatTime(t)} / ${formatTime(d)}`;
    if (this.seekInput && !this.scrubbing && d > 0) {
      this.seekInput.value = String(Math.round((t / d) * Number(this.seekInput.max)));
    }
    if (this.playButton) {
      const playing = !this.left.paused;
      this.playButton.textContent = playing ? 'Pause' : 'Play';
      this.playButton.setAttribute('aria-pressed', playing ? 'true' : 'false');
    }
  }
}

// Proportional scroll sync between two scrollable elements; returns an unbind function.
export function syncScroll(a, b) {
  // The scrollTop we last wrote to each element: its scroll event is our own echo.
  const written = new Map();
  const handler = (src, dst) => () => {
    if (written.has(src)) {
      const value = written.get(src);
      written.delete(src);
      if (Math.abs(src.scrollTop - value) <= 1) return;
    }
    const srcMax = src.scrollHeight - src.clientHeight;
    const dstMax = dst.scrollHeight - dst.clientHeight;
    if (dstMax <= 0) return;
    const target = Math.round((srcMax > 0 ? src.scrollTop / srcMax : 0) * dstMax);
    if (Math.abs(dst.scrollTop - target) <= 1) return;
    dst.scrollTop = target;
    written.set(dst, dst.scrollTop);
  };
  const onA = handler(a, b);
  const onB = handler(b, a);
  a.addEventListener('scroll', onA, { passive: true });
  b.addEventListener('scroll', onB, { passive: true });
  return () => {
    a.removeEventListener('scroll', onA);
    b.removeEventListener('scroll', onB);
  };
}
