// attnlab attention-pattern viewer (report section "patterns"; data format in report/viewer.py).
// Pick a head; click (pin) or hover/focus (preview) a token: every token is shaded by the weight the chosen token
// puts on it ("attends to", a row of the pattern) or by the weight it puts on the chosen token ("attended to by",
// a column). Each token gets data-weight and a title with the weight; the readout lists the top 5 non-zero
// weights; the legend gives the weight of the full shade. Linkable views:
// report.html#pattern=LAYER.HEAD&token=POSITION&mode=row|column (applied as a real click; an unknown head is named
// in the readout).
(() => {
  "use strict";
  const root = document.getElementById("pattern-viewer");
  const data = JSON.parse(document.getElementById("pattern-data").textContent);
  const select = document.getElementById("pattern-head");
  const readout = document.getElementById("pattern-readout");
  const box = root.querySelector(".pattern-tokens");
  const spans = Array.from(box.querySelectorAll(".pt"));
  const legendMax = document.getElementById("pattern-legend-max");
  const state = { head: 0, mode: "row", pinned: null, preview: null, notice: "" };
  const say = (text) => { readout.textContent = state.notice ? state.notice + ". " + text : text; };

  // Weight query `q` puts on key `k` in the current head; null where masked (causal: k > q) or missing.
  const weight = (q, k) => {
    const row = data.heads[state.head].w[q];
    const w = row && k < row.length ? row[k] : null;
    return w === null ? null : w / data.scale;
  };
  const quoted = (pos) => "'" + data.tokens[pos] + "'";
  const baseTitle = (pos) => "position " + pos + " · " + quoted(pos);  // as report/viewer.py token_title

  function clear() {
    for (const span of spans) {
      span.classList.remove("sel", "masked", "dark");
      span.removeAttribute("data-weight");
      span.style.background = span.style.color = "";
      span.title = baseTitle(Number(span.dataset.pos));
    }
    legendMax.textContent = "max";
    say("Click or hover a token.");
  }

  function show(pos) {
    const column = state.mode === "column";
    const weights = spans.map((_, k) => (column ? weight(k, pos) : weight(pos, k)));
    const largest = Math.max(...weights.map((w) => w || 0));
    const max = largest || 1;  // shade relative to the largest weight shown
    spans.forEach((span, k) => {
      const w = weights[k];
      span.classList.toggle("sel", k === pos);
      span.classList.toggle("masked", w === null);
      span.classList.remove("dark");
      if (w === null) {
        span.removeAttribute("data-weight");
        span.style.background = span.style.color = "";
        span.title = baseTitle(k) + " · masked";
        return;
      }
      const shade = w / max;
      span.dataset.weight = w.toFixed(4);
      span.style.background = "rgba(31, 95, 174, " + shade.toFixed(3) + ")";
      span.style.color = shade > 0.55 ? "#fff" : "";
      span.classList.toggle("dark", shade > 0.55);  // control glyphs (.ctl) turn white too
      span.title = baseTitle(k) + " · weight " + w.toFixed(4);
    });
    legendMax.textContent = largest.toFixed(4);
    const top = weights.map((w, k) => [w, k]).filter(([w]) => w !== null && w > 0)
      .sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, 5)
      .map(([w, k]) => quoted(k) + " @" + k + " " + w.toFixed(4));
    say("token " + quoted(pos) + " @" + pos + (column ? " is attended to by: " : " attends to: ")
      + (top.length ? top.join(", ") : "nothing else"));
  }

  function update() {
    const pos = state.preview !== null ? state.preview : state.pinned;
    if (pos === null) clear(); else show(pos);
  }

  function pin(pos) {
    state.pinned = pos;
    spans.forEach((span, k) => span.setAttribute("aria-pressed", String(k === pos)));
    update();
  }

  const position = (event) => {
    const span = event.target.closest(".pt");
    return span && box.contains(span) ? Number(span.dataset.pos) : null;
  };

  box.addEventListener("click", (event) => {
    const pos = position(event);
    if (pos !== null) { state.preview = null; pin(pos); }
  });
  box.addEventListener("mouseover", (event) => {
    const pos = position(event);
    if (pos !== null) { state.preview = pos; update(); }
  });
  box.addEventListener("mouseleave", () => { state.preview = null; update(); });
  box.addEventListener("focusin", (event) => { state.preview = position(event); update(); });
  box.addEventListener("focusout", () => { state.preview = null; update(); });
  box.addEventListener("keydown", (event) => {
    const pos = position(event);
    if (pos === null) return;
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
    if (event.key === "Enter" || event.key === " ") spans[pos].click();
    else if (step && spans[pos + step]) spans[pos + step].focus();
    else return;
    event.preventDefault();
  });
  select.addEventListener("change", () => { state.head = select.selectedIndex; state.notice = ""; update(); });
  for (const radio of root.querySelectorAll("input[name=pattern-mode]")) {
    radio.addEventListener("change", () => { if (radio.checked) { state.mode = radio.value; update(); } });
  }

  function setMode(mode) {
    const radio = root.querySelector("input[name=pattern-mode][value=" + mode + "]");
    if (radio) { radio.checked = true; state.mode = mode; }
  }

  function applyFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (!params.has("pattern") && !params.has("token")) return;
    const wanted = params.get("pattern");
    const index = data.heads.findIndex((h) => h.layer + "." + h.head === wanted);
    if (index >= 0) { select.selectedIndex = state.head = index; }
    const shown = data.heads[state.head];
    state.notice = wanted !== null && index < 0
      ? "no head " + wanted + " in this report; showing " + shown.layer + "." + shown.head : "";
    if (params.get("mode") === "row" || params.get("mode") === "column") setMode(params.get("mode"));
    const text = params.get("token");
    const token = text !== null && /^[0-9]+$/.test(text) ? spans[Number(text)] : null;  // "" or junk: ignored
    if (token) token.dispatchEvent(new MouseEvent("click", { bubbles: true }));
    update();
    root.scrollIntoView();
  }

  for (const hidden of root.querySelectorAll("[data-needs-script]")) hidden.hidden = false;
  for (const note of root.querySelectorAll("[data-no-script]")) note.hidden = true;
  setMode(root.querySelector("input[name=pattern-mode]:checked").value);
  clear();
  applyFragment();
  window.addEventListener("hashchange", applyFragment);
})();
