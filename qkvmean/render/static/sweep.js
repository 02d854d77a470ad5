"use strict";
(function () {
  const meta = JSON.parse(document.getElementById("qkv-meta").textContent);
  const $ = (id) => document.getElementById(id);
  const state = { metric: meta.start, pinned: null };
  const view = {
    meta: meta, state: state, ready: false, error: null, errors: [],
    value: value, label: label, render: render, set: set, format: fmt,
  };
  window.qkvView = view;
  window.addEventListener("error", (e) => view.errors.push(String(e.message)));
  window.addEventListener("scroll", () => { $("tip").hidden = $("mark").hidden = true; },
    { passive: true });  // both are placed where the pointer was
  window.addEventListener("resize", placePin);

  function fail(err) {
    view.error = String(err && err.message ? err.message : err);
    const s = $("status");
    s.className = "error";
    s.textContent = "The page cannot show the sweep: " + view.error;
    console.error("qkvmean view: " + view.error);
  }

  // The mean over the inputs of a metric in one cell (null: no condition there).
  function value(metric, panel, row, col) {
    return meta.metrics[metric].values[panel][row][col];
  }

  function label(panel, row, col) {
    return meta.panels[panel].labels[row][col];
  }

  function fmt(v) {
    if (v === null || v === undefined) return "not swept";
    const s = String(Number(v.toPrecision(meta.digits)));
    return s.replace("-", "\u2212");
  }

  function colorIndex(v, vmin, vmax) {
    const x = (v - vmin) / (vmax - vmin);
    return Math.min(255, Math.max(0, Math.floor(x * 256)));
  }

  function cellPx() {
    const most = Math.max(meta.rows.length, meta.cols.length, 1);
    return Math.max(10, Math.min(40, Math.floor(360 / most)));
  }

  function titleOf(p) {
    const t = document.createElement("div");
    t.className = "ptitle";
    if (p.tensor) {
      const i = document.createElement("i");
      i.textContent = p.tensor;
      t.append(p.verb + " ", i);
    } else {
      t.textContent = p.title;
    }
    return t;
  }

  function labels(names, side, cell) {
    const box = document.createElement("div");
    box.className = side === "y" ? "ylabels" : "xlabels";
    const n = names.length, px = n * cell;
    const step = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(px / 14))));
    let longest = 0;
    for (let t = 0; t < n; t += step) {
      const s = document.createElement("span");
      s.textContent = names[t];
      s.dataset.position = t;
      if (side === "y") s.style.top = (t + 0.5) * cell + "px";
      else s.style.left = (t + 0.5) * cell + "px";
      longest = Math.max(longest, names[t].length);
      box.append(s);
    }
    if (side === "y") {
      box.style.height = px + "px";
      box.style.width = Math.ceil(longest * 7) + 8 + "px";
    } else {
      box.style.width = px + "px";
      box.style.height = "16px";
    }
    return box;
  }

  function panel(index, m) {
    const p = meta.panels[index], values = m.values[index];
    const rows = meta.rows.length, cols = meta.cols.length;
    const cell = cellPx(), lut = meta.luts[m.cmap];
    const div = document.createElement("div");
    div.className = "panel";
    div.dataset.panel = index;
    if (p.target) div.dataset.target = p.target;
    const name = document.createElement("div");
    name.className = "row-name";
    name.textContent = meta.row_name;
    const canvas = document.createElement("canvas");
    canvas.width = cols;
    canvas.height = rows;
    canvas.style.width = cols * cell + "px";
    canvas.style.height = rows * cell + "px";
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(cols, rows);
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const v = values[r][c], j = 4 * (r * cols + c);
        const rgb = v === null ? meta.missing :
          lut.slice(3 * colorIndex(v, m.vmin, m.vmax), 3 * colorIndex(v, m.vmin, m.vmax) + 3);
        img.data[j] = rgb[0];
        img.data[j + 1] = rgb[1];
        img.data[j + 2] = rgb[2];
        img.data[j + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    canvas.addEventListener("mousemove", (e) => hover(e, canvas, index));
    canvas.addEventListener("mouseleave", () => {
      $("tip").hidden = $("mark").hidden = true;
      status();
    });
    canvas.addEventListener("click", (e) => {
      const [row, col] = cellAt(e, canvas);
      state.pinned = { panel: index, row: row, col: col };
      placePin();
      status();
    });
    const axis = document.createElement("div");
    axis.className = "axis-name";
    axis.textContent = meta.col_name;
    axis.style.width = cols * cell + "px";
    const title = titleOf(p);
    title.style.maxWidth = Math.max(cols * cell, 240) + "px";
    div.append(title, name, labels(meta.rows, "y", cell), canvas,
      labels(meta.cols, "x", cell), axis);
    return div;
  }

  function cellAt(e, canvas) {
    const r = canvas.getBoundingClientRect(), rows = meta.rows.length, cols = meta.cols.length;
    const col = Math.min(cols - 1, Math.max(0, Math.floor((e.clientX - r.left) / r.width * cols)));
    const row = Math.min(rows - 1, Math.max(0, Math.floor((e.clientY - r.top) / r.height * rows)));
    return [row, col];
  }

  function describe(index, row, col) {
    const p = meta.panels[index];
    const where = meta.sweep === "heads" ? "layer " + meta.rows[row] + ", head " + meta.cols[col]
      : meta.rows[row] + ", layer " + meta.cols[col];
    return {
      label: p.labels[row][col], value: value(state.metric, index, row, col),
      panel: (p.tensor ? p.verb + " " + p.tensor : p.title) + " \u00b7 " + where,
    };
  }

  function line(d) {
    const n = meta.inputs.length;
    return (d.label || "no condition") + " \u00b7 " + state.metric + " " + fmt(d.value) +
      (d.label ? " (mean over " + n + " input" + (n === 1 ? "" : "s") + ")" : "");
  }

  function status() {
    const s = $("status");
    if (state.pinned) {
      const p = state.pinned;
      s.textContent = "Selected: " + line(describe(p.panel, p.row, p.col));
    } else {
      s.textContent = "Hover a cell for its condition and value; click it to keep it here.";
    }
  }

  function hover(e, canvas, index) {
    const [row, col] = cellAt(e, canvas);
    const d = describe(index, row, col), r = canvas.getBoundingClientRect();
    const cw = r.width / meta.cols.length, ch = r.height / meta.rows.length;
    const mark = $("mark");
    mark.style.left = r.left + col * cw + "px";
    mark.style.top = r.top + row * ch + "px";
    mark.style.width = cw + "px";
    mark.style.height = ch + "px";
    mark.hidden = false;
    $("tip-panel").textContent = d.panel;
    $("tip-condition").textContent = d.label || "none (not swept)";
    $("tip-metric").textContent = state.metric;
    $("tip-value").textContent = fmt(d.value);
    const tip = $("tip");
    tip.dataset.panel = index;
    tip.dataset.row = row;
    tip.dataset.col = col;
    tip.dataset.condition = d.label || "";
    tip.hidden = false;
    const x = e.clientX + 14, y = e.clientY + 14;
    tip.style.left = Math.min(x, window.innerWidth - tip.offsetWidth - 4) + "px";
    tip.style.top = Math.min(y, window.innerHeight - tip.offsetHeight - 4) + "px";
    $("status").textContent = line(d);
  }

  function placePin() {
    let pin = $("pin");
    if (!state.pinned) { if (pin) pin.remove(); return; }
    const canvas = document.querySelector(
      '.panel[data-panel="' + state.pinned.panel + '"] canvas');
    if (!canvas) return;
    if (!pin) {
      pin = document.createElement("div");
      pin.id = "pin";
      document.body.append(pin);
    }
    const r = canvas.getBoundingClientRect();
    const cw = r.width / meta.cols.length, ch = r.height / meta.rows.length;
    pin.style.position = "absolute";
    pin.style.left = r.left + window.scrollX + state.pinned.col * cw + "px";
    pin.style.top = r.top + window.scrollY + state.pinned.row * ch + "px";
    pin.style.width = cw + "px";
    pin.style.height = ch + "px";
  }

  function tickText(v) {
    const s = String(Number(v.toPrecision(3)));
    return s.replace("-", "\u2212");
  }

  function colorbar(m) {
    const c = $("cbar"), ctx = c.getContext("2d"), img = ctx.createImageData(1, 256);
    const lut = meta.luts[m.cmap];
    for (let i = 0; i < 256; i++) {
      const k = 3 * (255 - i);  // the top row is the highest value
      img.data.set([lut[k], lut[k + 1], lut[k + 2], 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    const ticks = $("cbar-ticks");
    ticks.textContent = "";
    ticks.style.height = c.getBoundingClientRect().height + "px";
    for (let i = 0; i <= 4; i++) {
      const v = m.vmin + (m.vmax - m.vmin) * i / 4;
      const s = document.createElement("span");
      s.textContent = tickText(v);
      s.dataset.value = v;
      s.style.top = (1 - i / 4) * 100 + "%";
      ticks.append(s);
    }
    $("cbar-label").textContent = m.label;
  }

  function render() {
    const m = meta.metrics[state.metric];
    if (!m) throw new Error("no metric " + state.metric);
    const grid = $("grid");
    grid.textContent = "";
    grid.style.gridTemplateColumns = "repeat(" + meta.panels.length + ", auto)";
    meta.panels.forEach((_, i) => grid.append(panel(i, m)));
    colorbar(m);
    $("title").textContent = m.title;
    $("caption").textContent = m.caption;
    $("metric").value = state.metric;
    $("tip").hidden = $("mark").hidden = true;
    placePin();
    status();
  }

  // Change the view from a script (tests, notebooks): set({metric: "ce_change"}).
  function set(changes) {
    Object.assign(state, changes);
    render();
  }

  function controls() {
    const n = meta.inputs.length;
    $("info").textContent = [meta.store, meta.model ? "model " + meta.model : "raw Q/K/V",
      "--sweep " + meta.sweep + ": " + meta.conditions + " conditions",
      "mean over " + n + " of " + meta.total_inputs + " inputs"].join(" \u00b7 ");
    const select = $("metric");
    const groups = [["Effects on the output", meta.order.filter((x) => meta.metrics[x].effect)],
      ["Attention of the substituted head", meta.order.filter((x) => !meta.metrics[x].effect)]];
    for (const [name, list] of groups) {
      if (!list.length) continue;
      const g = document.createElement("optgroup");
      g.label = name;
      for (const x of list) g.append(new Option(x, x));
      select.append(g);
    }
    select.addEventListener("change", () => { state.metric = select.value; render(); });
    $("note").textContent = "Each cell: the mean over the inputs of the metric for the " +
      "condition that substitutes " + (meta.sweep === "heads" ? "that head alone at that layer"
        : "that tensor at that layer alone") + "." +
      (meta.missing_cells ? " Grey cells were not swept." : "");
  }

  function start() {
    controls();
    render();
    view.ready = true;
    document.documentElement.dataset.ready = "true";
  }

  try { start(); } catch (err) { fail(err); }
})();
