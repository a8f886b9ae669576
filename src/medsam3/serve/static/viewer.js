// medsam3 web viewer: upload, prompt, review the overlay, refine with a box, download.
// Talks only to this server's JSON API (see /docs). Volumes arrive once as raw uint8 arrays in the display
// frame (canonical LPS; axial anterior up, patient right on the left) and are sliced here.
// On a volume a box segments either the slice it is drawn on or, drawn on a slice of the plane the volume
// was acquired in (display.acquired_plane), the whole volume from that key slice ("propagate").
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"), file: $("file-input"), drop: $("dropzone"), info: $("image-info"),
    form: $("prompt-form"), prompt: $("prompt-input"), segment: $("segment-btn"), scope: $("scope"),
    chips: $("chips"), opacity: $("opacity"), opacityValue: $("opacity-value"), planes: $("planes"),
    slider: $("slice-slider"), sliceLabel: $("slice-label"), viewport: $("viewport"), canvas: $("view"),
    readout: $("readout"), orientation: $("orientation"), mask: $("download-mask"), seg: $("download-seg"),
    json: $("download-json"), boxScope: $("box-scope"), boxSlice: $("box-slice"), propagate: $("propagate"),
    propagateOption: $("propagate-option"), clearBox: $("clear-box"), boxHint: $("box-hint"),
    conceptsHint: $("concepts-hint"),
  };
  // The reason of an absent label whose prompt the model does not know (it is not segmented).
  const UNKNOWN = "unknown concept";
  const OUTSIDE = "outside the training domain";
  const ctx = el.canvas.getContext("2d");
  const PLANE_TITLES = { axial: "Axial", coronal: "Coronal", sagittal: "Sagittal", image: "Image" };
  // Letters at the edges of display slices: top, bottom, left, right.
  const MARKS = { axial: "A P R L", coronal: "S I R L", sagittal: "S I A P" };

  const state = {
    image: null,        // image metadata from the server
    volume: null,       // Uint8Array, display shape (Z, Y, X[, C])
    labels: null,       // Uint8Array | Uint16Array, display shape (Z, Y, X)
    job: null,          // last finished job status
    colours: new Map(), // label value -> [r, g, b]
    hidden: new Set(),  // label values switched off by their chip
    plane: "axial",
    index: { axial: 0, coronal: 0, sagittal: 0, image: 0 },
    opacity: 0.55,
    box: null,          // [x1, y1, x2, y2] in slice pixels (last box sent or being drawn)
    boxSlice: null,     // {plane, index} the box belongs to
    wantPropagate: false, // "whole volume from this box" chosen (used where the plane allows it)
    drag: null,
    busy: false,
    fit: null,          // {dx, dy, dw, dh, rows, cols}
  };

  // -- status and errors ---------------------------------------------------------------------------
  function setStatus(text, kind) {
    el.status.textContent = text;
    document.body.dataset.state = kind || (state.image ? "ready" : "empty");
  }

  async function api(path, options = {}) {
    const response = await fetch(path, { credentials: "same-origin", ...options });
    if (response.status === 401) {
      window.location.href = "/login";
      throw new Error("authentication required");
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
      const err = new Error(message);
      err.status = response.status;
      err.retryAfter = Number(response.headers.get("Retry-After")) || 0;
      throw err;
    }
    return response;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // -- uploading -----------------------------------------------------------------------------------
  async function upload(file) {
    if (!file || state.busy) return;
    state.busy = true;
    setStatus(`Uploading ${file.name} (${(file.size / 1048576).toFixed(1)} MB)…`, "busy");
    try {
      const form = new FormData();
      form.append("file", file, file.name);
      const info = await (await api("/api/images", { method: "POST", body: form })).json();
      setStatus(`Loading ${info.name}…`, "busy");
      const raw = await (await api(`/api/images/${info.image_id}/display`)).arrayBuffer();
      state.image = info;
      state.volume = new Uint8Array(raw);
      clearResult();
      state.wantPropagate = false;
      const planes = Object.keys(info.display.planes);
      // Volumes open on the plane they were acquired in (finest in-plane detail; boxes there propagate).
      state.plane = planes.includes(info.display.acquired_plane) ? info.display.acquired_plane : planes[0];
      for (const p of planes) state.index[p] = Math.floor(info.display.planes[p].count / 2);
      buildPlaneTabs(planes);
      showInfo(info);
      el.prompt.disabled = false;
      el.segment.disabled = false;
      setStatus(`${info.name}: ${info.is_3d ? "volume" : "2D image"} ready. Type what to segment.`, "ready");
      el.prompt.focus();
      render();
    } catch (err) {
      setStatus(`Upload failed: ${err.message}`, "error");
    } finally {
      state.busy = false;
    }
  }

  function showInfo(info) {
    const fmt = (v) => Number(v).toPrecision(4).replace(/\.?0+$/, "");
    const spacing = info.spacing_known ? `${info.spacing.map(fmt).join(" × ")} mm` : "not stated (pixels)";
    const rows = [
      ["File", info.name], ["Format", info.format],
      ["Type", info.is_3d ? "3D volume" : (info.is_color ? "2D colour image" : "2D image")],
      ["Size", [...info.shape].reverse().join(" × ") + (info.is_3d ? " (x × y × z)" : " (w × h)")],
      ["Spacing", spacing], ["Modality", info.modality],
    ];
    el.info.replaceChildren(...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      return [dt, dd];
    }));
    el.info.hidden = false;
    el.orientation.textContent = info.is_3d ? `stored as ${info.orientation}, shown in LPS` : "";
  }

  function buildPlaneTabs(planes) {
    el.planes.replaceChildren(...planes.map((p) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = PLANE_TITLES[p];
      b.dataset.plane = p;
      b.setAttribute("role", "tab");
      b.addEventListener("click", () => { state.plane = p; syncSlider(); render(); });
      return b;
    }));
    syncSlider();
  }

  function syncSlider() {
    const geo = state.image.display.planes[state.plane];
    el.slider.max = String(geo.count - 1);
    el.slider.value = String(state.index[state.plane]);
    el.slider.disabled = geo.count < 2;
    el.slider.hidden = geo.count < 2;
    for (const b of el.planes.children) b.setAttribute("aria-selected", String(b.dataset.plane === state.plane));
  }

  // -- scope of a box: this slice, or the whole volume from it --------------------------------------
  const article = (word) => (/^[aeiou]/.test(word) ? "an" : "a");

  function boxHere() {
    return Boolean(state.box && state.boxSlice && state.boxSlice.plane === state.plane &&
      state.boxSlice.index === state.index[state.plane]);
  }

  // Why a box on the displayed plane cannot segment the whole volume, or "" when it can. Only the plane the
  // volume was acquired in holds key slices (the server refuses the others).
  function propagateBlock() {
    const info = state.image;
    if (!info || !info.is_3d) return "only volumes can be segmented from a box on one slice";
    const acquired = info.display.acquired_plane;
    if (!acquired) return "the server did not say which plane this volume was acquired in";
    if (info.display.planes[acquired].count < 2) return "this volume has a single slice";
    if (state.plane !== acquired) {
      return `draw the box on ${article(acquired)} ${acquired} slice to propagate it through the volume`;
    }
    return "";
  }

  const propagateChosen = () => state.wantPropagate && !propagateBlock();

  function syncScope() {
    const volume = Boolean(state.image && state.image.is_3d);
    el.scope.hidden = !volume;
    el.boxScope.hidden = !volume;
    el.boxHint.hidden = true;
    if (!volume) return;
    const block = propagateBlock();
    el.propagate.disabled = Boolean(block);
    el.propagateOption.classList.toggle("disabled", Boolean(block));
    el.propagateOption.title = block ? block[0].toUpperCase() + block.slice(1) :
      "Segment the whole volume: the box marks the structure on this key slice and it is followed " +
      "through the neighbouring slices";
    el.propagate.checked = propagateChosen();
    el.boxSlice.checked = !el.propagate.checked;
    if (block) {
      el.boxHint.textContent = `Whole volume from a box: ${block}` + (state.wantPropagate ?
        `; a box on this ${state.plane} slice segments this slice only.` : ".");
      el.boxHint.hidden = false;
    }
    const here = boxHere();
    el.clearBox.hidden = !state.box;
    el.scope.classList.toggle("inactive", here);
    el.scope.title = here ? "The box drawn on this slice decides what is segmented (Box, below)" : "";
  }

  // -- segmenting ----------------------------------------------------------------------------------
  function concepts() {
    return el.prompt.value.split(",").map((s) => s.trim()).filter(Boolean);
  }

  async function segment(box) {
    if (!state.image || state.busy) return;
    const texts = concepts();
    if (!texts.length && !box) {
      setStatus("Type a concept (e.g. liver) or drag a box on the image.", "error");
      return;
    }
    const prompts = texts.length ? texts.map((text) => ({ text })) : [{}];
    if (box) prompts[0].boxes = [box];
    const body = { prompts };
    const scope = document.querySelector('input[name="scope"]:checked');
    if (state.image.is_3d && (box || (scope && scope.value === "slice"))) {
      body.slice = { plane: state.plane, index: state.index[state.plane] };
    }
    const propagate = Boolean(box && state.image.is_3d && propagateChosen());
    if (propagate) body.propagate = true;
    state.busy = true;
    el.segment.disabled = true;
    const what = texts.join(", ") || "the box";
    setStatus(propagate ? `Segmenting ${what} through the volume from ${state.plane} slice ` +
      `${state.index[state.plane] + 1}…` : `Segmenting ${what}…`, "busy");
    try {
      let job;
      for (let attempt = 0; ; attempt++) {
        try {
          job = await (await api(`/api/images/${state.image.image_id}/segment`, {
            method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
          })).json();
          break;
        } catch (err) {
          if (err.status !== 503 || attempt >= 5) throw err;
          setStatus(`Server busy; retrying in ${err.retryAfter || 2} s…`, "busy");
          await sleep(1000 * (err.retryAfter || 2));
        }
      }
      job = await waitFor(job.job_id, what);
      if (job.status === "failed") {
        const hint = /2D images only|3D volume/.test(job.error) ? " Choose 'this slice' to segment one slice." : "";
        setStatus(`Segmentation failed: ${job.error}${hint}`, "error");
        return;
      }
      await showResult(job);
      const found = job.result.labels.filter((l) => !l.absent).length;
      const unknown = job.result.labels.filter((l) => l.reason === UNKNOWN);
      const notKnown = unknown.length ? ` Not segmented, unknown to this model: ${unknown.map((l) => `“${l.name}”`)
        .join(", ")} (it knows ${(unknown[0].known_concepts || []).join(", ")}).` : "";
      const outside = job.result.labels.filter((l) => l.reason === OUTSIDE);
      const notInDomain = outside.length ? ` Not segmented, this image is unlike the model's training images ` +
        `for ${outside.map((l) => `“${l.name}”`).join(", ")}.` : "";
      let spread = "";
      const key = job.result.scope.key_slice;
      if (key) {
        const count = state.image.display.planes[key.plane].count;
        spread = ` Labels on ${labelledSlices(key.plane)} of ${count} ${key.plane} slices, propagated from ` +
          `slice ${key.index + 1}.`;
      }
      setStatus(`Done in ${job.seconds.toFixed(2)} s: ${found} of ${job.result.labels.length} found.${spread}` +
        notKnown + notInDomain, "done");
    } catch (err) {
      setStatus(`Segmentation failed: ${err.message}`, "error");
    } finally {
      state.busy = false;
      el.segment.disabled = false;
    }
  }

  async function waitFor(jobId, what) {
    for (let delay = 150; ; delay = Math.min(1000, delay * 1.4)) {
      const job = await (await api(`/api/jobs/${jobId}`)).json();
      if (job.status === "done" || job.status === "failed") return job;
      const where = job.queue_position ? ` (position ${job.queue_position} in the queue)` : "";
      setStatus(`Segmenting ${what}: ${job.status}${where}…`, "busy");
      await sleep(delay);
    }
  }

  async function showResult(job) {
    const response = await api(`/api/jobs/${job.job_id}/labels`);
    const buffer = await response.arrayBuffer();
    const dtype = response.headers.get("X-Dtype") || "uint8";
    state.labels = dtype === "uint16" ? new Uint16Array(buffer)
      : dtype === "uint32" ? new Uint32Array(buffer) : new Uint8Array(buffer);
    state.job = job;
    state.colours = new Map(job.result.labels.filter((l) => l.color).map((l) => [l.value, l.color]));
    state.hidden.clear();
    buildChips(job.result.labels);
    setDownloads(job);
    const scope = job.result.scope;
    // A slice result: show the slice that was segmented. A volume propagated from a box: the labels cover
    // the whole volume (every plane shows them); open the key slice the box was drawn on.
    const shown = scope.kind === "slice" ? scope : scope.key_slice;
    if (shown) {
      state.plane = shown.plane;
      state.index[shown.plane] = shown.index;
      syncSlider();
    }
    document.body.dataset.job = job.job_id;
    render();
  }

  // Number of slices of ``plane`` with at least one label (display frame, labels of the whole volume).
  function labelledSlices(plane) {
    const [Z, Y, X] = state.image.display.shape;
    const labels = state.labels;
    const seen = new Uint8Array(plane === "coronal" ? Y : plane === "sagittal" ? X : Z);
    for (let z = 0, v = 0; z < Z; z++) {
      for (let y = 0; y < Y; y++) {
        for (let x = 0; x < X; x++, v++) {
          if (labels[v]) seen[plane === "coronal" ? y : plane === "sagittal" ? x : z] = 1;
        }
      }
    }
    return seen.reduce((a, b) => a + b, 0);
  }

  function buildChips(labels) {
    const pct = (v) => (v === null || v === undefined ? "–" : `${Math.round(v * 100)}%`);
    el.chips.replaceChildren(...labels.map((l) => {
      const chip = document.createElement("span");
      const unknown = l.reason === UNKNOWN;
      const outside = l.reason === OUTSIDE;
      chip.className = "chip" + (l.absent ? " absent" : "") + (unknown ? " unknown" : "") +
        (outside ? " outside" : "");
      chip.dataset.value = l.value ?? "";
      const dot = document.createElement("span");
      dot.className = "dot";
      if (l.color) dot.style.background = `rgb(${l.color.join(",")})`;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = l.name;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = unknown ? "unknown concept · not segmented"
        : outside ? "outside its training domain · not segmented"
        : l.absent ? `absent · presence ${pct(l.presence)}`
        : `score ${pct(l.score)} · presence ${pct(l.presence)}`;
      chip.title = unknown ? `This model does not know “${l.name}”; it knows only: ` +
        `${(l.known_concepts || []).join(", ")}.`
        : outside ? `This image is unlike the images this model learnt “${l.name}” on (distance ` +
        `${l.domain_distance.toFixed(3)} > ${l.domain_threshold.toFixed(3)}); not segmented.`
        : l.absent ? `not found (${l.reason})` : `${l.area_px} pixels` +
        (l.area_mm2 ? `, ${l.area_mm2.toFixed(1)} mm²` : "") + " (click to hide or show)";
      const text = document.createElement("span");
      text.className = "text";
      text.append(name, score);
      chip.append(dot, text);
      if (!l.absent && l.value !== null) {
        chip.addEventListener("click", () => {
          if (state.hidden.has(l.value)) state.hidden.delete(l.value); else state.hidden.add(l.value);
          chip.classList.toggle("hidden-label", state.hidden.has(l.value));
          render();
        });
      }
      return chip;
    }));
  }

  function setDownloads(job) {
    const files = job.result.files;
    const base = `/api/jobs/${job.job_id}`;
    const enable = (a, href, label) => {
      a.href = href; a.classList.remove("disabled"); a.removeAttribute("aria-disabled");
      if (label) a.textContent = label;
    };
    enable(el.mask, `${base}/mask`, `Mask (.${state.image.mask_format})`);
    enable(el.json, `${base}/summary`);
    el.seg.hidden = !files.dicom_seg;
    if (files.dicom_seg) enable(el.seg, `${base}/dicom-seg`);
  }

  function clearResult() {
    state.labels = null; state.job = null; state.box = null; state.boxSlice = null;
    state.colours = new Map(); state.hidden.clear();
    el.chips.replaceChildren(Object.assign(document.createElement("span"),
      { className: "muted", textContent: "No segmentation yet." }));
    for (const a of [el.mask, el.seg, el.json]) {
      a.classList.add("disabled"); a.setAttribute("aria-disabled", "true"); a.removeAttribute("href");
    }
    el.seg.hidden = true;
    el.mask.textContent = "Mask";
    el.readout.textContent = "\u00a0";
  }

  // -- slicing and drawing -------------------------------------------------------------------------
  // Index of voxel (row r, column c) of the displayed slice in a (Z, Y, X) array; coronal and
  // sagittal slices are shown superior up (rows run from the last z to the first).
  function voxelIndex(shape, plane, index, r, c) {
    const [Z, Y, X] = shape;
    if (plane === "axial" || plane === "image") return (index * Y + r) * X + c;
    if (plane === "coronal") return ((Z - 1 - r) * Y + index) * X + c;
    return ((Z - 1 - r) * Y + c) * X + index;
  }

  function sliceCanvas(kind) {
    const info = state.image;
    const plane = state.plane;
    const geo = info.display.planes[plane];
    const { rows, cols } = geo;
    const index = state.index[plane];
    const shape = info.display.shape;
    const canvas = document.createElement("canvas");
    canvas.width = cols; canvas.height = rows;
    const g = canvas.getContext("2d");
    const img = g.createImageData(cols, rows);
    const px = img.data;
    if (kind === "image") {
      const ch = info.display.channels;
      const src = state.volume;
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < cols; c++) {
          const v = voxelIndex(shape, plane, index, r, c);
          const o = (r * cols + c) * 4;
          if (ch === 1) { px[o] = px[o + 1] = px[o + 2] = src[v]; } else {
            px[o] = src[v * ch]; px[o + 1] = src[v * ch + 1]; px[o + 2] = src[v * ch + 2];
          }
          px[o + 3] = 255;
        }
      }
    } else {
      const src = state.labels;
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < cols; c++) {
          const value = src[voxelIndex(shape, plane, index, r, c)];
          if (!value || state.hidden.has(value)) continue;
          const colour = state.colours.get(value) || [255, 255, 0];
          const o = (r * cols + c) * 4;
          px[o] = colour[0]; px[o + 1] = colour[1]; px[o + 2] = colour[2]; px[o + 3] = 255;
        }
      }
    }
    g.putImageData(img, 0, 0);
    return canvas;
  }

  function render() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(el.viewport.clientWidth * dpr));
    const h = Math.max(1, Math.round(el.viewport.clientHeight * dpr));
    if (el.canvas.width !== w || el.canvas.height !== h) { el.canvas.width = w; el.canvas.height = h; }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    syncScope();
    if (!state.image) return;
    const plane = state.plane;
    const geo = state.image.display.planes[plane];
    // Aspect from spacing: each pixel is col_spacing wide and row_spacing tall.
    const widthMm = geo.cols * geo.col_spacing;
    const heightMm = geo.rows * geo.row_spacing;
    const margin = 16 * dpr;
    const scale = Math.min((w - 2 * margin) / widthMm, (h - 2 * margin) / heightMm);
    const dw = widthMm * scale, dh = heightMm * scale;
    const dx = (w - dw) / 2, dy = (h - dh) / 2;
    state.fit = { dx, dy, dw, dh, rows: geo.rows, cols: geo.cols, dpr };
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(sliceCanvas("image"), dx, dy, dw, dh);
    if (state.labels && state.opacity > 0) {
      ctx.globalAlpha = state.opacity;
      ctx.drawImage(sliceCanvas("labels"), dx, dy, dw, dh);
      ctx.globalAlpha = 1;
    }
    drawBox();
    drawMarks(dx, dy, dw, dh, dpr);
    const count = geo.count;
    el.sliceLabel.textContent = count > 1 ? `${PLANE_TITLES[plane]} ${state.index[plane] + 1} / ${count}` : "";
  }

  function drawBox() {
    const box = state.drag ? state.drag.box : state.box;
    if (!box || !state.fit) return;
    const here = { plane: state.plane, index: state.index[state.plane] };
    if (!state.drag && state.boxSlice &&
        (state.boxSlice.plane !== here.plane || state.boxSlice.index !== here.index)) return;
    const { dx, dy, dw, dh, rows, cols, dpr } = state.fit;
    const x1 = dx + (box[0] / cols) * dw, y1 = dy + (box[1] / rows) * dh;
    const x2 = dx + (box[2] / cols) * dw, y2 = dy + (box[3] / rows) * dh;
    ctx.save();
    ctx.lineWidth = 2 * dpr;
    ctx.setLineDash([6 * dpr, 4 * dpr]);
    ctx.strokeStyle = "#ffffff";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.restore();
  }

  function drawMarks(dx, dy, dw, dh, dpr) {
    const marks = MARKS[state.plane];
    if (!marks) return;
    const [top, bottom, left, right] = marks.split(" ");
    ctx.save();
    ctx.fillStyle = "rgba(230, 237, 243, 0.75)";
    ctx.font = `${12 * dpr}px system-ui, sans-serif`;
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    ctx.fillText(top, dx + dw / 2, dy + 4 * dpr);
    ctx.textBaseline = "bottom";
    ctx.fillText(bottom, dx + dw / 2, dy + dh - 4 * dpr);
    ctx.textBaseline = "middle"; ctx.textAlign = "left";
    ctx.fillText(left, dx + 4 * dpr, dy + dh / 2);
    ctx.textAlign = "right";
    ctx.fillText(right, dx + dw - 4 * dpr, dy + dh / 2);
    ctx.restore();
  }

  // -- mouse: box drawing, wheel scrolling, readout ------------------------------------------------
  function toSlice(event) {
    if (!state.fit) return null;
    const rect = el.canvas.getBoundingClientRect();
    const { dx, dy, dw, dh, rows, cols, dpr } = state.fit;
    const x = ((event.clientX - rect.left) * dpr - dx) / dw * cols;
    const y = ((event.clientY - rect.top) * dpr - dy) / dh * rows;
    return { x, y, inside: x >= 0 && y >= 0 && x <= cols && y <= rows, rows, cols };
  }

  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

  el.canvas.addEventListener("mousedown", (event) => {
    const p = toSlice(event);
    if (!p || !p.inside || state.busy || event.button !== 0) return;
    state.drag = { x0: p.x, y0: p.y, box: null };
  });

  window.addEventListener("mousemove", (event) => {
    const p = toSlice(event);
    if (state.drag && p) {
      const x = clamp(p.x, 0, p.cols), y = clamp(p.y, 0, p.rows);
      const { x0, y0 } = state.drag;
      state.drag.box = [Math.min(x0, x), Math.min(y0, y), Math.max(x0, x), Math.max(y0, y)];
      render();
    }
    if (p && p.inside && event.target === el.canvas) {
      const r = Math.floor(p.y), c = Math.floor(p.x);
      const shape = state.image.display.shape;
      const v = voxelIndex(shape, state.plane, state.index[state.plane], r, c);
      const ch = state.image.display.channels;
      const shown = ch === 1 ? state.volume[v] : Array.from(state.volume.slice(v * ch, v * ch + ch)).join(",");
      const label = state.labels ? state.labels[v] : 0;
      el.readout.textContent = `x ${c}  y ${r}  display ${shown}` + (label ? `  label ${label}` : "");
    }
  });

  window.addEventListener("mouseup", () => {
    if (!state.drag) return;
    const box = state.drag.box;
    state.drag = null;
    if (!box || box[2] - box[0] < 2 || box[3] - box[1] < 2) { render(); return; }
    state.box = box.map((v) => Math.round(v * 10) / 10);
    state.boxSlice = { plane: state.plane, index: state.index[state.plane] };
    render();
    segment(state.box);
  });

  el.canvas.addEventListener("wheel", (event) => {
    if (!state.image) return;
    event.preventDefault();
    step(event.deltaY > 0 ? 1 : -1);
  }, { passive: false });

  function step(delta) {
    const geo = state.image.display.planes[state.plane];
    const next = clamp(state.index[state.plane] + delta, 0, geo.count - 1);
    if (next !== state.index[state.plane]) {
      state.index[state.plane] = next;
      el.slider.value = String(next);
      render();
    }
  }

  document.addEventListener("keydown", (event) => {
    if (!state.image || event.target === el.prompt) return;
    if (event.key === "ArrowUp" || event.key === "PageUp") { step(1); event.preventDefault(); }
    if (event.key === "ArrowDown" || event.key === "PageDown") { step(-1); event.preventDefault(); }
  });

  // -- controls ------------------------------------------------------------------------------------
  el.slider.addEventListener("input", () => {
    state.index[state.plane] = Number(el.slider.value);
    render();
  });
  el.opacity.addEventListener("input", () => {
    state.opacity = Number(el.opacity.value) / 100;
    el.opacityValue.textContent = `${el.opacity.value}%`;
    render();
  });
  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const onThisSlice = state.box && state.boxSlice && state.boxSlice.plane === state.plane &&
      state.boxSlice.index === state.index[state.plane];
    segment(onThisSlice ? state.box : null);
  });
  el.file.addEventListener("change", () => upload(el.file.files[0]));
  for (const radio of [el.boxSlice, el.propagate]) {
    radio.addEventListener("change", () => {
      state.wantPropagate = el.propagate.checked;
      render();
      if (boxHere() && state.image && !state.busy) {
        setStatus(state.wantPropagate ? "Press Segment to segment the whole volume from this box."
          : "Press Segment to segment this slice from the box.", "ready");
      }
    });
  }
  el.clearBox.addEventListener("click", () => {
    state.box = null;
    state.boxSlice = null;
    render();
  });

  // Drag and drop anywhere on the page.
  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    document.body.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });

  // The concepts a model records (its concepts.json): anything else is reported, not segmented.
  async function showConcepts() {
    try {
      const info = await (await api("/api/info")).json();
      const known = info.concepts && !info.concepts.open_vocabulary ? info.concepts.known : null;
      el.conceptsHint.hidden = !known;
      if (known) {
        el.conceptsHint.textContent = `This model knows only: ${known.join(", ")}. Other concepts are ` +
          "reported as unknown, not segmented.";
        el.prompt.placeholder = `e.g. ${known.slice(0, 2).join(", ")}`;
      }
    } catch (err) { /* the hint is optional */ }
  }

  new ResizeObserver(() => render()).observe(el.viewport);
  render();
  showConcepts();
})();
