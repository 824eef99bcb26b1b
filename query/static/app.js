/* Estate image search: the static search page (served at /ui/). Plain ES2020, no dependencies. */
'use strict';

(() => {
  const K = 48;                // results per search: shown PAGE at a time
  const PAGE = 12;             // results shown at first, and added by each 'Show more'
  const MAX_SIDE = 1600;       // longest side sent, in pixels, until the index says what it needs (upload_px)
  const JPEG_QUALITY = 0.9;
  const SENT_AS_IS = ['image/jpeg', 'image/png', 'image/webp'];  // what the service reads
  const MIN_CROP_PX = 12;      // a smaller drag is a tap, not a crop
  const KEY_STEP = 0.05;       // an arrow key moves or resizes the crop box by this share of the photo
  const KEY_MIN = 0.1;         // the smallest crop box the keys make, as a share of the photo
  const CROP_HINT = 'Optional: drag on the photo, or tap two opposite corners, to crop to the item.';
  const MAX_SIDES = 16;        // more photos of the item the service takes (more_images)
  const LOCALE = undefined;    // the browser's own locale

  const NETWORK_MESSAGE = 'Cannot reach the search service. Check your connection and try again.';
  const RANDOM_WARNING = 'This index was built with random (untrained) weights, so similar items, prices and categories are not meaningful.';

  const $ = (id) => document.getElementById(id);
  const el = {
    servedVersion: $('served-version'), servedStage: $('served-stage'), catalogueSize: $('catalogue-size'),
    banner: $('banner-random'), bannerText: $('banner-random-text'),
    dropZone: $('drop-zone'), emptyState: $('empty-state'),
    cameraInput: $('camera-input'), fileInput: $('file-input'),
    preview: $('preview'), previewImg: $('preview-img'), previewFallback: $('preview-fallback'),
    cropBox: $('crop-box'), cropRow: $('crop-row'), cropHint: $('crop-hint'), cropClear: $('crop-clear'),
    sides: $('sides'), sidesList: $('sides-list'), sidesInput: $('sides-input'),
    form: $('filters'), details: $('filters-details'), filterCount: $('filter-count'),
    filtersClear: $('filters-clear'), category: $('filter-category'),
    searchButton: $('search-button'), error: $('error'), busy: $('busy'), busyText: $('busy-text'),
    estimate: $('estimate'), estPrice: $('estimate-price'), estRangeRow: $('estimate-range-row'),
    estRange: $('estimate-range'), estConfRow: $('estimate-confidence-row'), estConf: $('estimate-confidence'),
    estMeter: $('estimate-meter'), estCompsHeading: $('estimate-comparables-heading'),
    estComps: $('estimate-comparables'),
    assist: $('assist'), assistCategory: $('assist-category'), assistDuplicates: $('assist-duplicates'),
    resultsTitle: $('results-title'), back: $('back-to-photo'), took: $('took'),
    resultsEmpty: $('results-empty'), results: $('results'), resultsStatus: $('results-status'),
    showMore: $('show-more'),
  };

  // Filter inputs by the API's field name.
  const FILTERS = {
    category: $('filter-category'),
    min_price: $('filter-min-price'),
    max_price: $('filter-max-price'),
    sold_after: $('filter-sold-after'),
    sold_before: $('filter-sold-before'),
  };

  const state = {
    file: null,          // the chosen File
    image: null,         // a decoded HTMLImageElement of it, or null when the browser cannot read it
    objectUrl: null,
    crop: null,          // {x, y, w, h} as fractions of the photo, or null
    sides: [],           // more photos of the same item: {file, image (decoded or null), url, crop}
    lastAssist: null,    // the last /assist answer
    shown: [],           // the matches of the last answer (state.visible of them in the grid)
    visible: 0,
    inflight: 0,
    searchCtl: null,     // the AbortController of the search in flight
    searchSource: null,  // what it is: 'assist' | 'similar'
    hasAnswer: false,
    errorSource: null,   // 'index' | 'assist' | 'similar' | 'client'
    uploadPx: null,      // the short side the served index needs (GET /index); more is only decoded away
  };

  // ---------- small helpers ----------

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value == null || value === false) continue;
        if (key === 'class') node.className = value;
        else if (key === 'text') node.textContent = value;
        else node.setAttribute(key, value === true ? '' : String(value));
      }
    }
    for (const child of children) if (child != null && child !== false) node.append(child);
    return node;
  }

  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

  function percent(v) {
    return isNum(v) ? Math.round(Math.min(1, Math.max(0, v)) * 100) : 0;
  }

  function money(value, currency) {
    if (!isNum(value)) return '';
    const digits = Math.abs(value - Math.round(value)) < 0.005 ? 0 : 2;
    const opts = { minimumFractionDigits: digits, maximumFractionDigits: digits };
    if (currency) {
      try {
        return new Intl.NumberFormat(LOCALE, { ...opts, style: 'currency', currency }).format(value);
      } catch (_) {
        return `${new Intl.NumberFormat(LOCALE, opts).format(value)} ${currency}`;
      }
    }
    return new Intl.NumberFormat(LOCALE, opts).format(value);
  }

  function date(text) {
    if (typeof text !== 'string' || !/^\d{4}-\d{2}-\d{2}/.test(text)) return text ? String(text) : '';
    const d = new Date(`${text.slice(0, 10)}T00:00:00Z`);
    if (Number.isNaN(d.getTime())) return text;
    try {
      return new Intl.DateTimeFormat(LOCALE, { year: 'numeric', month: 'short', day: 'numeric', timeZone: 'UTC' }).format(d);
    } catch (_) {
      return text;
    }
  }

  const sentence = (text) => text.charAt(0).toUpperCase() + text.slice(1) + (/[.!?]$/.test(text) ? '' : '.');
  const titleOf = (m) => (m && m.title ? String(m.title) : `Item ${m && m.item_id != null ? m.item_id : ''}`.trim());
  const listOf = (v) => (Array.isArray(v) ? v.filter((m) => m && typeof m === 'object') : []);

  function placeholder(cls) {
    return h('div', { class: `${cls} photo-none`, 'aria-hidden': 'true' }, 'No photo');
  }

  function photo(m, cls, alt) {
    if (!m.photo_url) return placeholder(cls);
    const img = h('img', { loading: 'lazy', decoding: 'async', class: cls, alt, src: m.photo_url });
    img.addEventListener('error', () => img.replaceWith(placeholder(cls)), { once: true });
    return img;
  }

  // ---------- busy and errors ----------

  function begin(text) {
    state.inflight += 1;
    el.busyText.textContent = text;
    syncBusy();
  }

  function end() {
    state.inflight = Math.max(0, state.inflight - 1);
    syncBusy();
  }

  function syncBusy() {
    const busy = state.inflight > 0;
    el.busy.hidden = !busy;
    el.results.setAttribute('aria-busy', busy ? 'true' : 'false');
    el.searchButton.disabled = busy;
  }

  class UiError extends Error {
    constructor(message, status, field) {
      super(message);
      this.name = 'UiError';
      this.status = status;
      this.field = field || null;
    }
  }

  // retryAfter: the seconds the service asked to wait (its Retry-After header), or 0
  function explain(status, body, context, retryAfter = 0) {
    const apiMessage = body && typeof body.error === 'string' ? body.error.trim() : '';
    const withApi = (text) => (apiMessage ? `${text} ${apiMessage}` : text);
    switch (status) {
      case 400: return withApi('Please check your search:') + (apiMessage ? '' : ' something in it could not be used.');
      case 404: return context === 'similar'
        ? 'That item is no longer in the catalogue, so there is nothing to compare it with.'
        : 'The search service could not find what was asked for.';
      case 413: return withApi('That photo is too large.');
      // the formats the service reads: model_store.preprocess.UPLOAD_FORMAT_NAMES (tests/test_ui.py checks)
      case 415: return 'That file is not a photo the service can read. '
        + 'Please use a JPEG, PNG, WebP, HEIC, AVIF, GIF, TIFF or BMP photo.';
      case 429: return `Too many searches at once. Please try again ${retryAfter > 1 ? `in ${retryAfter} seconds` : 'in a moment'}.`;
      case 503: return 'The search service is starting or unavailable. Please try again shortly.';
      default:
        return status >= 500
          ? 'Something went wrong in the search service. Please try again in a moment.'
          : withApi('The search could not be done.');
    }
  }

  async function api(url, init, context) {
    let response;
    try {
      response = await fetch(url, { ...init, headers: { Accept: 'application/json' } });
    } catch (err) {
      if (err && err.name === 'AbortError') throw err;
      throw new UiError(NETWORK_MESSAGE, 0);
    }
    let body = null;
    let text = '';
    try {
      text = await response.text();
    } catch (err) {
      if (err && err.name === 'AbortError') throw err;
      throw new UiError(NETWORK_MESSAGE, 0);
    }
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const field = body && typeof body.field === 'string' ? body.field : null;
      const retryAfter = Number.parseInt(response.headers.get('Retry-After') || '0', 10) || 0;
      throw new UiError(explain(response.status, body, context, retryAfter), response.status, field);
    }
    if (!body || typeof body !== 'object') {
      throw new UiError('The search service sent an answer this page cannot read. Please try again.', response.status);
    }
    return body;
  }

  function showError(message, source, field) {
    state.errorSource = source;
    el.error.textContent = message;
    el.error.hidden = false;
    markField(field);
    const r = el.error.getBoundingClientRect();
    if (r.top < 0 || r.bottom > window.innerHeight) el.error.scrollIntoView({ block: 'nearest' });
  }

  function clearError() {
    state.errorSource = null;
    el.error.hidden = true;
    el.error.textContent = '';
    markField(null);
  }

  function markField(field) {
    for (const [name, input] of Object.entries(FILTERS)) {
      if (name === field) {
        input.setAttribute('aria-invalid', 'true');
        input.setAttribute('aria-describedby', 'error');
        el.details.open = true;
      } else {
        input.removeAttribute('aria-invalid');
        input.removeAttribute('aria-describedby');
      }
    }
  }

  // ---------- served index ----------

  function applyServed(served) {
    if (!served || typeof served !== 'object') return;
    el.servedVersion.textContent = served.index ? String(served.index) : 'unknown';
    el.servedStage.textContent = served.stage ? `(${served.stage})` : '';
    const about = [served.embedder, served.weights].filter(Boolean).join(' · ');
    if (about) el.servedVersion.title = about;
    if (served.pretrained === false) {
      const text = served.warning ? String(served.warning) : RANDOM_WARNING;
      if (el.bannerText.textContent !== text) el.bannerText.textContent = text;
      el.banner.hidden = false;
    } else if (served.pretrained === true) {
      el.banner.hidden = true;
    }
  }

  function fillCategories(categories) {
    if (!Array.isArray(categories)) return;
    const current = el.category.value;
    const options = [h('option', { value: '' }, 'Any category')];
    for (const name of categories) {
      if (typeof name === 'string' && name) options.push(h('option', { value: name }, name));
    }
    el.category.replaceChildren(...options);
    if (current && categories.includes(current)) el.category.value = current;
    updateFilterCount();
  }

  async function loadIndex(attempt) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 15000);
    begin('Loading…');
    try {
      const data = await api('/index', { method: 'GET', signal: ctl.signal }, 'index');
      applyServed(data.served);
      fillCategories(data.categories);
      if (isNum(data.upload_px) && data.upload_px > 0) state.uploadPx = data.upload_px;
      if (isNum(data.items)) {
        el.catalogueSize.textContent = ` · ${new Intl.NumberFormat(LOCALE).format(data.items)} items`;
      }
      if (state.errorSource === 'index') clearError();
    } catch (err) {
      const message = err && err.name === 'AbortError'
        ? 'The search service is taking too long to answer. Please try again shortly.'
        : (err && err.message) || NETWORK_MESSAGE;
      if (el.servedVersion.textContent === 'loading…') el.servedVersion.textContent = 'unavailable';
      if (!state.hasAnswer && (state.errorSource === null || state.errorSource === 'index')) {
        showError(message, 'index');
      }
      if (attempt < 8 && !(err && err.status === 404)) {
        setTimeout(() => loadIndex(attempt + 1), Math.min(30000, 2000 * 2 ** attempt));
      }
    } finally {
      clearTimeout(timer);
      end();
    }
  }

  // ---------- filters ----------

  function filterEntries() {
    const out = [];
    for (const [name, input] of Object.entries(FILTERS)) {
      const value = String(input.value || '').trim();
      if (value !== '') out.push([name, value]);
    }
    return out;
  }

  function updateFilterCount() {
    const n = filterEntries().length;
    el.filterCount.textContent = n ? `(${n} on)` : '';
  }

  // ---------- photo in ----------

  function takeFile(file) {
    if (!file) return;
    loadPhoto(file).catch(() => { /* loadPhoto reports its own errors */ });
  }

  // The photo at `url` decoded, or null when this browser cannot read it (HEIC in Chrome, a broken file).
  async function decodeFile(url) {
    const img = new Image();
    img.decoding = 'async';
    img.src = url;
    try {
      await img.decode();
      return img.naturalWidth > 0 && img.naturalHeight > 0 ? img : null;
    } catch (_) {
      return null;
    }
  }

  async function loadPhoto(file) {
    if (state.searchCtl) state.searchCtl.abort();  // its answer would be about the previous photo
    state.file = file;
    state.image = null;
    setCrop(null);
    setSides([]);
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(file);

    // A new photo: the old answer is about another photo.
    state.lastAssist = null;
    showAssistView();
    renderResults([], null, 'Searching for similar sold items…');
    el.estimate.hidden = true;
    el.assist.hidden = true;

    el.emptyState.hidden = true;
    el.preview.hidden = false;
    el.cropRow.hidden = false;
    el.sides.hidden = false;

    const url = state.objectUrl;
    const img = await decodeFile(url);
    if (state.objectUrl !== url) return;  // another photo came in meanwhile

    state.image = img;
    showPreview(img ? url : null);
    if (img) {
      el.previewImg.alt = 'Your photo';
      el.cropHint.textContent = CROP_HINT;
    } else {
      el.cropHint.textContent = 'This file cannot be previewed, so it cannot be cropped.';
    }
    await search();
  }

  // The photo above: shown and croppable (focusable for the crop keys), or, with no url, the no-preview note.
  function showPreview(url) {
    if (url) el.previewImg.src = url;
    else el.previewImg.removeAttribute('src');
    el.previewImg.hidden = !url;
    el.previewFallback.hidden = !!url;
    el.preview.classList.toggle('can-crop', !!url);
    if (url) el.preview.tabIndex = 0;
    else el.preview.removeAttribute('tabindex');
  }

  function onFileInput(event) {
    const input = event.target;
    const file = input.files && input.files[0];
    takeFile(file);
    input.value = '';  // so choosing the same photo again still counts
  }

  const hasFiles = (event) => !!event.dataTransfer && Array.from(event.dataTransfer.types || []).includes('Files');

  function pickFile(files) {
    const list = Array.from(files || []);
    return list.find((f) => (f.type || '').startsWith('image/')) || list[0] || null;
  }

  // ---------- crop ----------

  let drag = null;
  let corner = null;  // the first corner of a crop made by two taps (no dragging needed), or null
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

  function pointFraction(event) {
    const r = el.previewImg.getBoundingClientRect();
    return {
      x: Math.min(1, Math.max(0, (event.clientX - r.left) / r.width)),
      y: Math.min(1, Math.max(0, (event.clientY - r.top) / r.height)),
      r,
    };
  }

  function showCropBox(box) {
    if (!box) {
      el.cropBox.hidden = true;
      return;
    }
    const s = el.cropBox.style;
    s.left = `${box.x * 100}%`;
    s.top = `${box.y * 100}%`;
    s.width = `${box.w * 100}%`;
    s.height = `${box.h * 100}%`;
    el.cropBox.hidden = false;
  }

  function setCrop(box) {
    corner = null;
    state.crop = box;
    showCropBox(box);
    el.cropClear.hidden = !box;
    el.previewImg.alt = box ? 'Your photo (cropped area marked)' : 'Your photo';
    if (state.image) {
      el.cropHint.textContent = box
        ? 'Cropped. Press Search to look for just this part.'
        : CROP_HINT;
    }
  }

  function onPointerDown(event) {
    if (!state.image || drag) return;
    if (event.pointerType === 'mouse' && event.button !== 0) return;
    const p = pointFraction(event);
    if (!p.r.width || !p.r.height) return;
    event.preventDefault();
    drag = { id: event.pointerId, x0: p.x, y0: p.y, box: null, before: state.crop };
    try { el.preview.setPointerCapture(event.pointerId); } catch (_) { /* not capturable: fine */ }
  }

  function onPointerMove(event) {
    if (!drag || event.pointerId !== drag.id) return;
    event.preventDefault();
    const p = pointFraction(event);
    drag.box = {
      x: Math.min(drag.x0, p.x), y: Math.min(drag.y0, p.y),
      w: Math.abs(p.x - drag.x0), h: Math.abs(p.y - drag.y0),
    };
    showCropBox(drag.box);
  }

  function bigEnough(box) {
    const r = el.previewImg.getBoundingClientRect();
    return !!box && box.w * r.width >= MIN_CROP_PX && box.h * r.height >= MIN_CROP_PX;
  }

  function onPointerUp(event) {
    if (!drag || event.pointerId !== drag.id) return;
    const { box, before, x0, y0 } = drag;
    drag = null;
    if (bigEnough(box)) {
      setCrop(box);
      return;
    }
    // A tap: the first marks a corner and the second the opposite one, for those who cannot drag.
    const first = corner;
    if (!first) {
      setCrop(before);
      corner = { x: x0, y: y0 };
      el.cropHint.textContent = 'Now tap the opposite corner of the item.';
      return;
    }
    const tapped = { x: Math.min(first.x, x0), y: Math.min(first.y, y0),
      w: Math.abs(x0 - first.x), h: Math.abs(y0 - first.y) };
    setCrop(bigEnough(tapped) ? tapped : before);
  }

  // With the photo focused: an arrow key draws a box, then moves it; Shift and an arrow resize it; Escape clears it.
  function onPreviewKey(event) {
    if (!state.image || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === 'Escape' && (state.crop || corner)) {
      event.preventDefault();
      setCrop(null);
      return;
    }
    const move = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[event.key];
    if (!move) return;
    event.preventDefault();  // not a scroll of the page
    const [dx, dy] = move.map((d) => d * KEY_STEP);
    const b = state.crop;
    if (!b) setCrop({ x: 0.1, y: 0.1, w: 0.8, h: 0.8 });
    else if (event.shiftKey) setCrop({ ...b, w: clamp(b.w + dx, KEY_MIN, 1 - b.x), h: clamp(b.h + dy, KEY_MIN, 1 - b.y) });
    else setCrop({ ...b, x: clamp(b.x + dx, 0, 1 - b.w), y: clamp(b.y + dy, 0, 1 - b.h) });
  }

  function onPointerCancel(event) {
    if (!drag || event.pointerId !== drag.id) return;
    const { before } = drag;
    drag = null;
    setCrop(before);
  }

  // ---------- upload ----------

  function canvasBlob(canvas) {
    return new Promise((resolve) => {
      try {
        canvas.toBlob((blob) => resolve(blob), 'image/jpeg', JPEG_QUALITY);
      } catch (_) {
        resolve(null);  // e.g. a canvas too large for this device
      }
    });
  }

  // A photo as it should be sent: cropped, downscaled and re-encoded where needed; else the file as is.
  async function prepareUpload(file, img, crop) {
    const original = { blob: file, name: file.name || 'photo' };
    if (!img) return original;  // the browser cannot read it: the service will say what is wrong

    const nw = img.naturalWidth;
    const nh = img.naturalHeight;
    let sx = 0; let sy = 0; let sw = nw; let sh = nh;
    if (crop) {
      sx = Math.min(nw - 1, Math.max(0, Math.round(crop.x * nw)));
      sy = Math.min(nh - 1, Math.max(0, Math.round(crop.y * nh)));
      sw = Math.max(1, Math.min(nw - sx, Math.round(crop.w * nw)));
      sh = Math.max(1, Math.min(nh - sy, Math.round(crop.h * nh)));
    }
    // A phone photo is sent at the size the index uses, not at full size: ~10x fewer bytes on a mobile
    // uplink, and the service decodes it ~7x faster (docs/PERFORMANCE.md, "What the page uploads").
    const shortSide = state.uploadPx ? state.uploadPx / Math.min(sw, sh) : Infinity;
    const scale = Math.min(1, MAX_SIDE / Math.max(sw, sh), shortSide);
    const readable = SENT_AS_IS.includes((file.type || '').toLowerCase());
    if (!crop && scale === 1 && readable) return original;

    const canvas = document.createElement('canvas');
    canvas.width = Math.max(1, Math.round(sw * scale));
    canvas.height = Math.max(1, Math.round(sh * scale));
    const ctx = canvas.getContext('2d');
    if (!ctx) return original;
    ctx.fillStyle = '#fff';  // transparent areas become white, not black, in a JPEG
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(img, sx, sy, sw, sh, 0, 0, canvas.width, canvas.height);
    const blob = await canvasBlob(canvas);
    if (!blob) return original;
    const base = (file.name || 'photo').replace(/\.[^.]*$/, '') || 'photo';
    return { blob, name: `${base}.jpg` };
  }

  async function sendable(file, img, crop) {
    try {
      return await prepareUpload(file, img, crop);
    } catch (_) {
      return { blob: file, name: file.name || 'photo' };
    }
  }

  // ---------- more photos of the item ----------

  function setSides(sides) {
    for (const side of state.sides) {
      if (!sides.some((s) => s.url === side.url) && side.url !== state.objectUrl) URL.revokeObjectURL(side.url);
    }
    state.sides = sides;
    el.sidesList.replaceChildren(...sides.map((side, i) => {
      const remove = h('button', { type: 'button', class: 'side-remove', 'data-side': i,
        'aria-label': `Remove photo ${i + 1} of the other sides` }, '×');
      // A photo the browser can show is a button: it swaps places with the photo above, to be cropped there.
      const thumb = side.image
        ? h('button', { type: 'button', class: `side-show${side.crop ? ' is-cropped' : ''}`, 'data-side': i,
          'aria-label': `Show other side ${i + 1} above, to crop it${side.crop ? ' (cropped)' : ''}` },
        h('img', { class: 'side-thumb', src: side.url, alt: `Other side ${i + 1}` }))
        : h('span', { class: 'side-thumb side-thumb-none', text: side.file.name || 'photo' });
      return h('li', { class: 'side' }, thumb, remove);
    }));
  }

  // The side photo i and the photo above swap places, each keeping its crop: any photo of the item can be
  // cropped above. The item's photos and crops stay the same, so its search stands.
  function showSide(i) {
    const side = state.sides[i];
    if (!side || !side.image || !state.file) return;
    const above = { file: state.file, url: state.objectUrl, image: state.image, crop: state.crop };
    state.file = side.file;
    state.objectUrl = side.url;
    state.image = side.image;
    setSides(state.sides.map((s, j) => (j === i ? above : s)));
    showPreview(side.url);
    setCrop(side.crop);
    if (!side.crop) {
      el.cropHint.textContent = `Other side ${i + 1} is shown above: drag on it, or tap two opposite corners, to crop it.`;
    }
  }

  async function addSides(files) {
    if (!state.file) return;
    const room = MAX_SIDES - state.sides.length;
    const added = Array.from(files || []).slice(0, Math.max(0, room));
    if (!added.length) {
      showError(`At most ${MAX_SIDES} more photos of one item can be sent.`, 'client');
      return;
    }
    const main = state.file;
    const sides = await Promise.all(added.map(async (file) => {
      const url = URL.createObjectURL(file);
      return { file, url, image: await decodeFile(url), crop: null };
    }));
    if (state.file !== main) {  // another item's photo came in meanwhile
      for (const side of sides) URL.revokeObjectURL(side.url);
      return;
    }
    setSides([...state.sides, ...sides]);
    await search();
  }

  // ---------- searches ----------

  // Runs one search (assist or similar); a newer one cancels it. Returns the answer, or null.
  async function runSearch(source, work) {
    if (state.searchCtl) state.searchCtl.abort();
    const ctl = new AbortController();
    state.searchCtl = ctl;
    state.searchSource = source;
    begin('Searching…');
    markField(null);
    try {
      const data = await work(ctl.signal);
      if (state.searchCtl !== ctl) return null;
      clearError();
      state.hasAnswer = true;
      return data;
    } catch (err) {
      if ((err && err.name === 'AbortError') || state.searchCtl !== ctl) return null;
      const message = err instanceof UiError ? err.message : 'Something went wrong on this page. Please try again.';
      showError(message, source, err && err.field);
      if (!state.shown.length) el.resultsEmpty.textContent = 'No results yet.';
      return null;
    } finally {
      if (state.searchCtl === ctl) state.searchCtl = null;
      end();
    }
  }

  async function search() {
    if (!state.file) {
      showError('Take or choose a photo first.', 'client');
      return;
    }
    const data = await runSearch('assist', async (signal) => {
      const upload = await sendable(state.file, state.image, state.crop);
      const sides = await Promise.all(state.sides.map((side) => sendable(side.file, side.image, side.crop)));
      if (signal.aborted) throw new DOMException('aborted', 'AbortError');
      const form = new FormData();
      form.append('image', upload.blob, upload.name);
      for (const side of sides) form.append('more_images', side.blob, side.name);
      form.append('k', String(K));
      for (const [name, value] of filterEntries()) form.append(name, value);
      return api('/assist', { method: 'POST', body: form, signal }, 'assist');
    });
    if (!data) return;
    state.lastAssist = data;
    applyServed(data.served);
    showAssistView();
    renderResults(listOf(data.nearest), data.took_ms);
    renderEstimate(data.estimate);
    renderAssistPanel(data.category, listOf(data.duplicates), data.duplicate_threshold);
  }

  async function moreLikeThis(match) {
    const params = new URLSearchParams({ k: String(K) });
    for (const [name, value] of filterEntries()) params.append(name, value);
    const url = `/similar/${encodeURIComponent(String(match.item_id))}?${params}`;
    const data = await runSearch('similar', (signal) => api(url, { method: 'GET', signal }, 'similar'));
    if (!data) return;
    applyServed(data.served);
    el.resultsTitle.textContent = `More like “${titleOf(match)}”`;
    el.back.hidden = false;
    renderResults(listOf(data.results), data.took_ms);
    el.resultsTitle.focus({ preventScroll: true });
    el.resultsTitle.scrollIntoView({ block: 'start' });
  }

  function showAssistView() {
    el.resultsTitle.textContent = 'Similar sold items';
    el.back.hidden = true;
  }

  function backToPhoto() {
    if (state.searchCtl && state.searchSource === 'similar') state.searchCtl.abort();
    showAssistView();
    const data = state.lastAssist;
    renderResults(data ? listOf(data.nearest) : [], data ? data.took_ms : null);
    el.resultsTitle.focus({ preventScroll: true });
    el.resultsTitle.scrollIntoView({ block: 'start' });
  }

  // ---------- rendering ----------

  // `waiting`: the text to show instead of results while a new search is on its way.
  function renderResults(matches, tookMs, waiting) {
    state.shown = matches;
    state.visible = Math.min(PAGE, matches.length);
    el.results.replaceChildren(...matches.slice(0, state.visible).map((m, i) => card(m, i)));
    updateShowMore();
    el.resultsEmpty.hidden = matches.length > 0;
    if (!matches.length) {
      el.resultsEmpty.textContent = waiting || (state.hasAnswer
        ? 'No similar sold items match. Try removing a filter.'
        : 'Results will appear here once you add a photo.');
    }
    el.took.textContent = isNum(tookMs) ? `Answered in ${Math.round(tookMs)} ms` : '';
    if (state.hasAnswer && !waiting) {
      el.resultsStatus.textContent = matches.length
        ? `${matches.length} similar sold ${matches.length === 1 ? 'item' : 'items'} found.`
        : 'No similar sold items found.';
    }
  }

  function updateShowMore() {
    const left = state.shown.length - state.visible;
    el.showMore.hidden = left <= 0;
    el.showMore.textContent = `Show ${Math.min(PAGE, left)} more`;
  }

  function showMore() {
    const from = state.visible;
    state.visible = Math.min(state.shown.length, from + PAGE);
    const cards = state.shown.slice(from, state.visible).map((m, i) => card(m, from + i));
    el.results.append(...cards);
    updateShowMore();
    el.resultsStatus.textContent = `Showing ${state.visible} of ${state.shown.length} similar sold items.`;
    const next = cards[0] && cards[0].querySelector('button');
    if (next) next.focus({ preventScroll: true });  // keyboard users go on where the new cards start
  }

  function card(m, index) {
    const title = titleOf(m);
    const titleId = `result-title-${index}`;
    const price = money(m.price, m.currency);
    return h('li', { class: 'result', 'data-item-id': m.item_id != null ? String(m.item_id) : '', 'data-index': index },
      h('div', { class: 'result-media' }, photo(m, 'result-photo', title)),
      h('div', { class: 'result-body' },
        h('h3', { class: 'result-title', id: titleId, text: title }),
        h('p', { class: 'result-price', text: price || 'Price not recorded' }),
        h('p', { class: 'result-category', text: m.category ? String(m.category) : 'Uncategorised' }),
        h('p', { class: 'result-date' },
          m.sold_at ? h('time', { datetime: String(m.sold_at), text: `Sold ${date(m.sold_at)}` }) : 'Sale date unknown'),
        h('p', { class: 'result-score', text: `${percent(m.score)}% similar` })),
      h('button', { type: 'button', class: 'button button-small more-like-this', 'aria-describedby': titleId },
        'More like this'));
  }

  // The confidence in words, in bands of docs/EVALUATION.md's measurement ("Price estimates"): of the prices
  // with a confidence under 10%, 24% were within 25% of the right level on shop photos (6% on COIL-100); at
  // 10-40%, 66% (53%); over 40%, 83% (93%). A number alone reads as a chance, which it is not.
  function trustIn(confidencePercent) {
    if (confidencePercent < 10) return 'Low confidence: a rough guess';
    return confidencePercent < 40 ? 'Medium confidence' : 'High confidence';
  }

  function renderEstimate(estimate) {
    const e = estimate && typeof estimate === 'object' ? estimate : {};
    const hasPrice = isNum(e.price);
    el.estPrice.textContent = hasPrice
      ? money(e.price, e.currency)
      : (e.reason ? sentence(String(e.reason)) : 'Not enough similar sold items to suggest a price.');
    el.estPrice.classList.toggle('is-reason', !hasPrice);

    const hasRange = hasPrice && isNum(e.low) && isNum(e.high);
    el.estRange.textContent = hasRange ? `${money(e.low, e.currency)} – ${money(e.high, e.currency)}` : '';
    el.estRangeRow.hidden = !hasRange;

    const confidence = percent(e.confidence);
    el.estConf.textContent = `${trustIn(confidence)} (${confidence}%)`;
    el.estMeter.style.width = `${confidence}%`;
    el.estConfRow.hidden = !hasPrice;

    const comps = listOf(e.comparables);
    el.estComps.replaceChildren(...comps.map((m) => h('li', { class: 'mini-item', 'data-item-id': String(m.item_id) },
      h('span', { class: 'mini-title', text: titleOf(m) }),
      h('span', { class: 'mini-meta', text: `${money(m.price, m.currency) || 'no price'} · ${percent(m.score)}% similar` }))));
    el.estComps.hidden = !comps.length;
    el.estCompsHeading.hidden = !comps.length;
    el.estimate.hidden = false;
  }

  function renderAssistPanel(category, duplicates, threshold) {
    const c = category && typeof category === 'object' ? category : {};
    let text = 'Suggested category: no suggestion';
    if (c.suggested) {
      text = `Suggested category: ${c.suggested} (${percent(c.confidence)}%)`;
      if (c.runner_up) text += `, runner-up ${c.runner_up} (${percent(c.runner_up_confidence)}%)`;
    } else if (c.reason) {
      text = `Suggested category: none. ${sentence(String(c.reason))}`;
    }
    el.assistCategory.textContent = text;

    if (!duplicates.length) {
      el.assistDuplicates.replaceChildren(h('p', { class: 'dup-none' }, 'Possible duplicates: none'));
    } else {
      const limit = isNum(threshold) ? ` (at least ${percent(threshold)}% similar)` : '';
      el.assistDuplicates.replaceChildren(
        h('p', { class: 'dup-title' }, h('strong', null, `Possible duplicates: ${duplicates.length}`)),
        h('p', { class: 'hint' },
          `These catalogue photos are so close${limit} that this may be the same item or photo listed again.`),
        h('ul', { class: 'mini-list dup-list' }, ...duplicates.map((m) => h('li', { class: 'mini-item dup-item', 'data-item-id': String(m.item_id) },
          photo(m, 'mini-photo', `Catalogue photo: ${titleOf(m)}`),
          h('span', { class: 'mini-text' },
            h('span', { class: 'mini-title', text: titleOf(m) }),
            h('span', { class: 'mini-meta', text: `${percent(m.score)}% similar${m.item_id != null ? ` · item ${m.item_id}` : ''}` }))))));
    }
    el.assist.hidden = false;
  }

  // ---------- wiring ----------

  el.cameraInput.addEventListener('change', onFileInput);
  el.fileInput.addEventListener('change', onFileInput);
  el.sidesInput.addEventListener('change', (event) => {
    const files = Array.from(event.target.files || []);
    event.target.value = '';  // so choosing the same photo again still counts
    addSides(files).catch(() => { /* search() reports its own errors */ });
  });
  el.sidesList.addEventListener('click', (event) => {
    const show = event.target.closest('.side-show');
    if (show) {
      const i = Number(show.dataset.side);
      showSide(i);
      const again = el.sidesList.querySelector(`.side-show[data-side="${i}"]`);
      if (again) again.focus();  // the list was redrawn: keep the keyboard where it was
      return;
    }
    const button = event.target.closest('.side-remove');
    if (!button) return;
    setSides(state.sides.filter((_, i) => i !== Number(button.dataset.side)));
    search();
  });

  el.dropZone.addEventListener('dragover', (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = 'copy';
    el.dropZone.classList.add('is-dragover');
  });
  el.dropZone.addEventListener('dragleave', (event) => {
    if (!el.dropZone.contains(event.relatedTarget)) el.dropZone.classList.remove('is-dragover');
  });
  el.dropZone.addEventListener('drop', (event) => {
    event.preventDefault();
    el.dropZone.classList.remove('is-dragover');
    takeFile(pickFile(event.dataTransfer && event.dataTransfer.files));
  });
  // A file dropped beside the drop zone must not make the browser leave the page.
  for (const type of ['dragover', 'drop']) {
    window.addEventListener(type, (event) => {
      if (hasFiles(event) && !el.dropZone.contains(event.target)) {
        event.preventDefault();
        if (type === 'dragover') event.dataTransfer.dropEffect = 'none';
      }
    });
  }

  document.addEventListener('paste', (event) => {
    const file = pickFile(event.clipboardData && event.clipboardData.files);
    if (!file) return;  // plain text pastes into fields as usual
    event.preventDefault();
    takeFile(file);
  });

  el.preview.addEventListener('pointerdown', onPointerDown);
  el.preview.addEventListener('pointermove', onPointerMove);
  el.preview.addEventListener('pointerup', onPointerUp);
  el.preview.addEventListener('pointercancel', onPointerCancel);
  el.preview.addEventListener('keydown', onPreviewKey);
  el.preview.addEventListener('dragstart', (event) => event.preventDefault());
  el.cropClear.addEventListener('click', () => {
    setCrop(null);
    el.searchButton.focus();
  });

  el.form.addEventListener('submit', (event) => {
    event.preventDefault();
    search();
  });
  el.form.addEventListener('input', updateFilterCount);
  el.form.addEventListener('change', updateFilterCount);
  el.filtersClear.addEventListener('click', () => {
    for (const input of Object.values(FILTERS)) input.value = '';
    markField(null);
    updateFilterCount();
  });

  el.results.addEventListener('click', (event) => {
    const button = event.target.closest('.more-like-this');
    if (!button) return;
    const item = button.closest('.result');
    const match = item && state.shown[Number(item.dataset.index)];
    if (match) moreLikeThis(match);
  });
  el.back.addEventListener('click', backToPhoto);
  el.showMore.addEventListener('click', showMore);

  // Filters start open where there is room for them, folded on phones.
  el.details.open = !window.matchMedia || window.matchMedia('(min-width: 900px)').matches;
  updateFilterCount();
  loadIndex(0);
})();
