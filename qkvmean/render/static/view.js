"use strict";
(function () {
  const meta = JSON.parse(document.getElementById("qkv-meta").textContent);
  const LEVELS = meta.levels, LUT = meta.lut, H = meta.heads, L = meta.layers.length;
  const COND = meta.conditions, PANEL = meta.panel;
  const $ = (id) => document.getElementById(id);
  const state = {
    shown: meta.shown.slice(), layer: meta.start.layer, head: meta.start.head,
    columns: meta.columns.slice(), baseline: false, diff: false,
  };
  const blocks = [];
  const view = {
    meta: meta, state: state, ready: false, error: null, errors: [], limit: null,
    map: map, shownMap: shownMap, render: render, set: set,
  };
  window.qkvView = view;
  window.addEventListener("error", (e) => view.errors.push(String(e.message)));
  window.addEventListener("scroll", () => { $("tip").hidden = $("mark").hidden = true; },
    { passive: true });  // both are placed where the pointer was

  function fail(err) {
    view.error = String(err && err.message ? err.message : err);
    const s = $("status");
    s.className = "error";
    s.textContent = "The page cannot show the maps: " + view.error;
    console.error("qkvmean view: " + view.error);
  }

  function bytesOf(text) {
    const bin = atob(text.replace(/\s+/g, ""));
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  async function decode(pos) {
    const n = meta.inputs[pos].n, count = COND.length * L * H * n * n;
    const raw = await inflate(bytesOf($("qkv-maps-" + pos).textContent));
    if (raw.length !== count * meta.planes) {
      throw new Error("the maps of input " + meta.inputs[pos].index + " are " + raw.length +
        " bytes, not " + count * meta.planes + ": the page is damaged");
    }
    if (meta.planes === 1) return raw;
    const out = new Uint16Array(count);
    for (let i = 0; i < count; i++) out[i] = raw[i] | (raw[count + i] << 8);
    return out;
  }

  // One map of an embedded input (position pos in meta.inputs), as weights, n*n row-major:
  // query rows, key columns. head: a number, or "mean" (the mean over the heads).
  function map(pos, cond, layer, head) {
    const n = meta.inputs[pos].n, nn = n * n, c = COND.indexOf(cond), blk = blocks[pos];
    if (c < 0) throw new Error("no condition " + cond);
    const out = new Float64Array(nn);
    const first = ((c * L + layer) * H) * nn;
    if (head === "mean") {
      for (let h = 0; h < H; h++) {
        const base = first + h * nn;
        for (let j = 0; j < nn; j++) out[j] += blk[base + j];
      }
      const scale = 1 / (H * LEVELS);
      for (let j = 0; j < nn; j++) out[j] *= scale;
    } else {
      const base = first + head * nn;
      for (let j = 0; j < nn; j++) out[j] = blk[base + j] / LEVELS;
    }
    return out;
  }

  // What a panel shows: the weights, or (diff mode) the weights minus the baseline's.
  function shownMap(pos, cond) {
    const m = map(pos, cond, state.layer, state.head);
    if (!state.diff) return m;
    const b = map(pos, "baseline", state.layer, state.head);
    for (let j = 0; j < m.length; j++) m[j] -= b[j];
    return m;
  }

  // A round upper limit for the symmetric scale: 0.05 -> 0.05, 0.37 -> 0.4.
  function niceCeiling(x) {
    if (!(x > 0)) return 1e-3;
    const step = Math.pow(10, Math.floor(Math.log10(x)));
    return Math.ceil(x / step - 1e-9) * step;
  }

  function colorIndex(v, vmin, vmax) {
    const x = (v - vmin) / (vmax - vmin);
    return Math.min(255, Math.max(0, Math.floor(x * 256)));
  }

  function fmt(v, signed) {
    const s = v.toFixed(meta.digits);
    return signed && v >= 0 ? "+" + s : s.replace("-", "\u2212");
  }

  function columnsShown() {
    const cols = [];
    if (state.baseline && !state.diff) cols.push("baseline");
    for (const c of meta.columns) if (state.columns.includes(c)) cols.push(c);
    return cols;
  }

  function titleOf(cond, index) {
    const t = document.createElement("div");
    t.className = "ptitle";
    if (cond === "baseline") {
      t.textContent = "Baseline (Input " + (index + 1) + ")";
    } else {
      t.append(meta.verb + " ");
      const i = document.createElement("i");
      i.textContent = meta.tensors[cond];
      t.append(i, " (Input " + (index + 1) + ")");
    }
    return t;
  }

  function short(label) {
    return label.length > 14 ? label.slice(0, 13) + "\u2026" : label;
  }

  function axisLabels(inp, side) {
    const box = document.createElement("div");
    box.className = side === "y" ? "ylabels" : "xlabels";
    const n = inp.n, cell = inp.cell, px = n * cell;
    const font = Math.max(7, Math.min(11, cell + 2));
    const step = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(px / (font + 2)))));
    let longest = 0;
    for (let t = 0; t < n; t += step) {
      const s = document.createElement("span");
      s.textContent = short(inp.tokens[t]);
      s.title = inp.tokens[t];
      s.style.fontSize = font + "px";
      s.dataset.position = t;
      if (side === "y") s.style.top = (t + 0.5) * cell + "px";
      else s.style.left = (t + 0.5) * cell + "px";
      longest = Math.max(longest, s.textContent.length);
      box.append(s);
    }
    const extent = Math.ceil(longest * font * 0.62) + 6;
    if (side === "y") { box.style.height = px + "px"; box.style.width = extent + "px"; }
    else { box.style.width = px + "px"; box.style.height = extent + "px"; }
    return box;
  }

  function panel(pos, cond, m, vmin, vmax) {
    const inp = meta.inputs[pos], n = inp.n, px = n * inp.cell;
    const div = document.createElement("div");
    div.className = "panel";
    div.dataset.input = inp.index;
    div.dataset.condition = cond;
    div.append(titleOf(cond, inp.index));
    if (n === 0) {
      const e = document.createElement("div");
      e.className = "empty";
      e.style.width = e.style.height = PANEL + "px";
      e.textContent = "no tokens";
      div.append(e);
      return div;
    }
    const canvas = document.createElement("canvas");
    canvas.width = n;
    canvas.height = n;
    canvas.style.width = px + "px";
    canvas.style.height = px + "px";
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(n, n);
    for (let j = 0; j < n * n; j++) {
      const k = 3 * colorIndex(m[j], vmin, vmax);
      img.data[4 * j] = LUT[k];
      img.data[4 * j + 1] = LUT[k + 1];
      img.data[4 * j + 2] = LUT[k + 2];
      img.data[4 * j + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    canvas.addEventListener("mousemove", (e) => hover(e, canvas, pos, cond));
    canvas.addEventListener("mouseleave", () => { $("tip").hidden = $("mark").hidden = true; });
    div.append(axisLabels(inp, "y"), canvas, axisLabels(inp, "x"));
    return div;
  }

  function hover(e, canvas, pos, cond) {
    const inp = meta.inputs[pos], n = inp.n, r = canvas.getBoundingClientRect();
    const col = Math.min(n - 1, Math.max(0, Math.floor((e.clientX - r.left) / r.width * n)));
    const row = Math.min(n - 1, Math.max(0, Math.floor((e.clientY - r.top) / r.height * n)));
    const w = map(pos, cond, state.layer, state.head)[row * n + col];
    const mark = $("mark"), cw = r.width / n, ch = r.height / n;  // the cell, outlined
    mark.style.left = r.left + col * cw + "px";
    mark.style.top = r.top + row * ch + "px";
    mark.style.width = cw + "px";
    mark.style.height = ch + "px";
    mark.hidden = false;
    const tip = $("tip");
    const where = (cond === "baseline" ? "Baseline" : meta.verb + " " +
      meta.tensors[cond]) + " (Input " + (inp.index + 1) + "), layer " +
      meta.layers[state.layer] + ", " + (state.head === "mean" ? "mean over heads" :
      "head " + state.head);
    $("tip-panel").textContent = where;
    $("tip-query").textContent = row + " \u201c" + inp.tokens[row] + "\u201d";
    $("tip-key").textContent = col + " \u201c" + inp.tokens[col] + "\u201d";
    $("tip-weight").textContent = fmt(w, false);
    let line = where + " \u00b7 query " + row + " \u201c" + inp.tokens[row] + "\u201d \u00b7 key " +
      col + " \u201c" + inp.tokens[col] + "\u201d \u00b7 weight " + fmt(w, false);
    if (state.diff) {
      const b = map(pos, "baseline", state.layer, state.head)[row * n + col];
      $("tip-baseline").textContent = fmt(b, false);
      $("tip-diff").textContent = fmt(w - b, true);
      line += " \u00b7 baseline " + fmt(b, false) + " \u00b7 difference " + fmt(w - b, true);
    }
    tip.classList.toggle("diff", state.diff);
    tip.dataset.input = inp.index;
    tip.dataset.condition = cond;
    tip.dataset.query = row;
    tip.dataset.key = col;
    tip.hidden = false;
    const x = e.clientX + 14, y = e.clientY + 14;
    tip.style.left = Math.min(x, window.innerWidth - tip.offsetWidth - 4) + "px";
    tip.style.top = Math.min(y, window.innerHeight - tip.offsetHeight - 4) + "px";
    $("status").textContent = line;
  }

  function colorbar(vmin, vmax, label) {
    const c = $("cbar"), ctx = c.getContext("2d"), img = ctx.createImageData(1, 256);
    for (let i = 0; i < 256; i++) {
      const k = 3 * (255 - i);  // the top row is the highest value
      img.data.set([LUT[k], LUT[k + 1], LUT[k + 2], 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    const ticks = $("cbar-ticks");
    ticks.textContent = "";
    ticks.style.height = c.getBoundingClientRect().height + "px";
    const values = state.diff ? [-1, -0.5, 0, 0.5, 1].map((f) => f * view.limit)
      : [0, 0.2, 0.4, 0.6, 0.8, 1.0];
    for (const v of values) {
      const s = document.createElement("span");
      s.textContent = state.diff ? fmt(v, v !== 0).replace(/0+$/, "").replace(/\.$/, "")
        : v.toFixed(1);
      s.dataset.value = v;
      s.style.top = (1 - (v - vmin) / (vmax - vmin)) * 100 + "%";
      ticks.append(s);
    }
    $("cbar-label").textContent = label;
  }

  function render() {
    const grid = $("grid");
    grid.textContent = "";
    const cols = columnsShown();
    const rows = state.shown.slice().sort((a, b) => a - b);
    if (!cols.length || !rows.length) {
      grid.textContent = "Tick at least one input and one column.";
      return;
    }
    grid.style.gridTemplateColumns = "repeat(" + cols.length + ", auto)";
    const maps = [];
    let peak = 0;
    for (const pos of rows) {
      for (const cond of cols) {
        const m = shownMap(pos, cond);
        if (state.diff) for (let j = 0; j < m.length; j++) peak = Math.max(peak, Math.abs(m[j]));
        maps.push([pos, cond, m]);
      }
    }
    view.limit = state.diff ? niceCeiling(peak) : null;
    const vmin = state.diff ? -view.limit : 0, vmax = state.diff ? view.limit : 1;
    for (const [pos, cond, m] of maps) grid.append(panel(pos, cond, m, vmin, vmax));
    colorbar(vmin, vmax, state.diff ? meta.diff_label : meta.label);
    $("tip").hidden = true;
  }

  // Change the view from a script (tests, notebooks): set({layer: 0, head: 3, diff: true}).
  function set(changes) {
    Object.assign(state, changes);
    sync();
    render();
  }

  function sync() {
    $("layer").value = String(state.layer);
    $("head").value = String(state.head);
    $("diff").checked = state.diff;
    $("col-baseline").checked = state.baseline;
    $("col-baseline").disabled = state.diff;
    for (const c of meta.columns) $("col-" + c).checked = state.columns.includes(c);
    meta.inputs.forEach((inp, pos) => { $("input-" + pos).checked = state.shown.includes(pos); });
  }

  function checkbox(parent, id, text, title) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = id;
    label.append(box, " " + text);
    if (title) label.title = title;
    parent.append(label);
    return box;
  }

  function controls() {
    const info = [meta.store, meta.source === "model" ? "model " + meta.model : "raw Q/K/V",
      meta.inputs.length + " of " + meta.total_inputs + " inputs embedded",
      L + " layers", H + " heads"];
    $("info").textContent = info.join(" \u00b7 ");
    const inputs = $("inputs");
    meta.inputs.forEach((inp, pos) => {
      const box = checkbox(inputs, "input-" + pos, "Input " + (inp.index + 1), inp.text ||
        inp.n + " tokens");
      box.addEventListener("change", () => {
        state.shown = state.shown.filter((p) => p !== pos);
        if (box.checked) state.shown.push(pos);
        render();
      });
    });
    const layer = $("layer");
    meta.layers.forEach((id, i) => layer.add(new Option(String(id), String(i))));
    layer.addEventListener("change", () => { state.layer = Number(layer.value); render(); });
    const head = $("head");
    head.add(new Option("mean", "mean"));
    for (let h = 0; h < H; h++) head.add(new Option(String(h), String(h)));
    head.addEventListener("change", () => {
      state.head = head.value === "mean" ? "mean" : Number(head.value);
      render();
    });
    const columns = $("columns");
    const base = checkbox(columns, "col-baseline", "Baseline");
    base.addEventListener("change", () => { state.baseline = base.checked; render(); });
    for (const c of meta.columns) {
      const box = checkbox(columns, "col-" + c, meta.tensors[c]);
      box.addEventListener("change", () => {
        state.columns = state.columns.filter((x) => x !== c);
        if (box.checked) state.columns.push(c);
        render();
      });
    }
    $("diff").addEventListener("change", () => {
      state.diff = $("diff").checked;
      sync();
      render();
    });
    sync();
    const step = (1 / LEVELS).toPrecision(3);
    $("note").textContent = "Weights embedded to " + meta.bits + " bits (steps of " + step +
      "): a weight shown is within \u00b1" + meta.max_error.toPrecision(2) +
      " of the store's, a difference within \u00b1" + (2 * meta.max_error).toPrecision(2) +
      ". Hover a cell for its tokens and weight." +
      (meta.limited ? " More inputs would make the page too large: qkvmean view --inputs " +
        "picks others." : "");
  }

  async function start() {
    if (typeof DecompressionStream !== "function") {
      throw new Error("this browser has no DecompressionStream (Chrome 80, Firefox 113, " +
        "Safari 16.4 or later have it)");
    }
    controls();
    const decoded = await Promise.all(meta.inputs.map((_, pos) => decode(pos)));
    decoded.forEach((b, pos) => { blocks[pos] = b; });
    render();
    $("status").textContent = "Hover a cell for its query token, key token and weight.";
    view.ready = true;
    document.documentElement.dataset.ready = "true";
  }

  start().catch(fail);
})();
