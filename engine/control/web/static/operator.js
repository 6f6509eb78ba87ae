// The operator page: controls built from the engine's parameter spec, state pushed over a websocket.

var SOCKET_RETRY_MS = 1000;  // reconnect the push socket after it closed
var SPEC_RETRY_MS = 1000;  // retry the spec until it answers
var API = document.body.dataset;  // the page's endpoints: spec, param, socket
var HOLD_MS = 1500;        // a control the user touched is not overwritten for this long
var THROTTLE_MS = 100;     // at most one change per parameter per this long
var TIMEOUT_MS = 4000;     // a request that hangs longer is given up
var MAX_RANGE_STEPS = 10000;  // int ranges wider than this get a number field, not a slider
var BAD_STATES = ["error", "lost", "stalled"];
var SERIES = [
  { key: "fps", label: "fps", color: "#7bd88f", floor: 1 },
  { key: "latency_ms", label: "latency", color: "#ffb454", floor: 10 },
  { key: "skip_rate", label: "skip", color: "#6cb6ff", floor: 0.01 }
];

var controls = {};      // name -> control (see makeRow)
var touched = {};       // name -> time of the last user interaction
var queues = {};        // name -> outgoing change queue
var dragging = null;    // name of the slider under the pointer
var online = null;      // whether the push socket is open and the engine answers
var knownScenes = [];
var lastValues = null;
var history = { seconds: 600, samples: [] };

function $(id) { return document.getElementById(id); }
function noop() {}
function isNum(v) { return typeof v === "number" && isFinite(v); }
function isObj(v) { return v !== null && typeof v === "object" && !Array.isArray(v); }
function has(obj, key) { return Object.prototype.hasOwnProperty.call(obj, key); }
function now() { return Date.now(); }

function el(tag, attrs, text) {
  var node = document.createElement(tag);
  if (attrs) {
    Object.keys(attrs).forEach(function (key) {
      if (attrs[key] !== null && attrs[key] !== undefined) { node.setAttribute(key, String(attrs[key])); }
    });
  }
  if (text !== undefined && text !== null) { node.textContent = String(text); }
  return node;
}

// ------------------------------------------------------------------ errors
var errorBox = $("error");
function showError(text) { errorBox.textContent = String(text); }
function clearError() { errorBox.textContent = ""; }
errorBox.addEventListener("click", clearError);

// ------------------------------------------------------------------ requests
function request(url, options) {
  var opts = options || {};
  var controller = typeof AbortController === "function" ? new AbortController() : null;
  var timer = null;
  opts.cache = "no-store";
  if (controller) {
    opts.signal = controller.signal;
    timer = setTimeout(function () { controller.abort(); }, TIMEOUT_MS);
  }
  return fetch(url, opts).then(function (response) {
    return response.text().then(function (text) {
      var body;
      try { body = text ? JSON.parse(text) : null; } catch { body = null; }
      if (!response.ok) {
        var err = new Error(isObj(body) && typeof body.error === "string" && body.error
          ? body.error : "HTTP " + response.status + " from " + url);
        err.status = response.status;
        throw err;
      }
      if (!isObj(body)) {
        var bad = new Error("unexpected reply from " + url);
        bad.status = response.status;
        throw bad;
      }
      return body;
    });
  }, function () {
    var err = new Error("engine not reachable");
    err.status = 0;
    throw err;
  }).finally(function () {
    if (timer !== null) { clearTimeout(timer); }
  });
}

// POST one change; resolves true when accepted (and clears #error), false otherwise.
function post(name, value) {
  return request(API.param, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name: name, value: value })
  }).then(function (body) {
    if (body.ok === false) {
      showError(typeof body.error === "string" ? body.error : name + ": refused");
      return false;
    }
    clearError();
    return true;
  }, function (err) {
    showError(err.status ? err.message : "engine not reachable: " + name + " was not sent");
    return false;
  });
}

// Per parameter: one request in flight, the newest value waiting, at most one per THROTTLE_MS.
function send(name, value, dedupe) {
  var q = queues[name];
  if (!q) {
    q = { busy: false, has: false, value: null, last: 0, lastJson: null, timer: null };
    queues[name] = q;
  }
  q.value = value;
  q.has = true;
  q.dedupe = Boolean(dedupe);
  pump(name, q);
}

function pump(name, q) {
  if (q.busy || q.timer !== null || !q.has) { return; }
  var wait = THROTTLE_MS - (now() - q.last);
  if (wait > 0) {
    q.timer = setTimeout(function () { q.timer = null; pump(name, q); }, wait);
    return;
  }
  var value = q.value;
  var json = JSON.stringify(value);
  q.has = false;
  if (q.dedupe && json === q.lastJson && now() - q.last < 1000) { return; }  // a slider's final change
  q.busy = true;
  q.last = now();
  q.lastJson = json;
  post(name, value).then(function () {
    q.busy = false;
    touched[name] = now();
    pump(name, q);
  });
}

function pending(name) {
  var q = queues[name];
  return Boolean(q && (q.busy || q.has || q.timer !== null));
}

// ------------------------------------------------------------------ formatting and parsing
var NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;

function plain(v) {
  if (!isNum(v)) { return ""; }
  return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
}

function decimals(step) {
  if (!isNum(step) || step <= 0 || step >= 1) { return 0; }
  return Math.min(6, Math.max(0, Math.ceil(-Math.log10(step) - 1e-9)));
}

function readNumber(text, isInt) {
  var s = String(text).trim();
  if (!NUMBER.test(s)) { return null; }
  var n = Number(s);
  if (!isFinite(n) || (isInt && !Number.isInteger(n))) { return null; }
  return n;
}

function formatValue(type, v) {
  if (v === null || v === undefined) { return ""; }
  if (type === "string" || type === "enum") { return typeof v === "string" ? v : String(v); }
  if (type === "int_list" || type === "float_list") {
    return Array.isArray(v) ? v.map(plain).join(" ") : "";
  }
  if (type === "size") {
    return Array.isArray(v) && v.length === 2 ? plain(v[0]) + "x" + plain(v[1]) : "";
  }
  if (type === "prompt_blend" || type === "seed_blend") {
    if (!Array.isArray(v)) { return ""; }
    return v.filter(function (pair) { return Array.isArray(pair) && pair.length >= 2; })
      .map(function (pair) {
        var first = typeof pair[0] === "number" ? plain(pair[0]) : String(pair[0]);
        return first + ": " + plain(pair[1]);
      }).join(" | ");
  }
  try { return JSON.stringify(v); } catch { return String(v); }
}

// -> {value: ...} | {error: "..."} | {skip: true} (nothing to send)
function parseText(type, text) {
  var s = String(text);
  if (type === "string") { return { value: s }; }
  if (s.trim() === "") { return { skip: true }; }
  if (type === "int_list" || type === "float_list") {
    var isInt = type === "int_list";
    var parts = s.trim().split(/[\s,;]+/).filter(Boolean);
    var numbers = [];
    for (var i = 0; i < parts.length; i += 1) {
      var n = readNumber(parts[i], isInt);
      if (n === null) {
        return { error: "cannot read " + JSON.stringify(parts[i]) + "; write "
          + (isInt ? "whole numbers" : "numbers") + " separated by spaces or commas, e.g. "
          + (isInt ? "32 45" : "0.5 1") };
      }
      numbers.push(n);
    }
    return { value: numbers };
  }
  if (type === "size") {
    var dims = s.trim().split(/[\sxX,*]+/).filter(Boolean);
    var w = dims.length === 2 ? readNumber(dims[0], true) : null;
    var h = dims.length === 2 ? readNumber(dims[1], true) : null;
    if (w === null || h === null) {
      return { error: "cannot read " + JSON.stringify(s.trim()) + "; write width x height, e.g. 512x512" };
    }
    return { value: [w, h] };
  }
  if (type === "prompt_blend" || type === "seed_blend") {
    var seeds = type === "seed_blend";
    var example = seeds ? "1: 0.5 | 2: 0.5" : "a cat: 0.5 | a dog: 0.5";
    var pairs = [];
    var segments = s.split("|");
    for (var j = 0; j < segments.length; j += 1) {
      var seg = segments[j].trim();
      if (seg === "") { continue; }
      var colon = seg.lastIndexOf(":");
      var head = colon < 0 ? "" : seg.slice(0, colon).trim();
      var weight = colon < 0 ? null : readNumber(seg.slice(colon + 1), false);
      var key = seeds ? readNumber(head, true) : head;
      if (weight === null || key === null || key === "") {
        return { error: "cannot read " + JSON.stringify(seg) + "; write "
          + (seeds ? "seed: weight" : "prompt: weight") + " pairs separated by |, e.g. " + example };
      }
      pairs.push([key, weight]);
    }
    return pairs.length ? { value: pairs } : { skip: true };
  }
  try { return { value: JSON.parse(s) }; } catch {
    return { error: "cannot read " + JSON.stringify(s.trim()) + " as JSON" };
  }
}

function titleCase(group) {
  return String(group).split("_").filter(Boolean).map(function (word) {
    return word.charAt(0).toUpperCase() + word.slice(1);
  }).join(" ");
}

// ------------------------------------------------------------------ controls
function floatStep(min, max) {
  var step = Math.pow(10, Math.round(Math.log10((max - min) / 1000)));
  return isNum(step) && step > 0 ? Number(step.toPrecision(1)) : "any";
}

function touch(name) { touched[name] = now(); }

// A slider (or a number field for unbounded or huge ranges) for float and int.
function numberControl(p, row, id, title) {
  var name = p.name;
  var isInt = p.type === "int";
  var min = p.min;
  var max = p.max;
  var bounded = isNum(min) && isNum(max) && max > min;
  var useRange = bounded && (!isInt || max - min <= MAX_RANGE_STEPS);
  var step = isInt ? 1 : (bounded ? floatStep(min, max) : "any");
  var places = isInt ? 0 : decimals(step === "any" ? 0.001 : step);
  var control = { blocking: [] };
  var range = null;
  var field = el("input", {
    type: "number", step: isInt ? 1 : "any", title: title, inputmode: isInt ? "numeric" : "decimal",
    min: isNum(min) ? min : null, max: isNum(max) ? max : null
  });

  function show(v) {
    row.classList.toggle("unset", !isNum(v));
    field.value = isNum(v) ? (isInt ? String(Math.round(v)) : v.toFixed(places)) : "";
    field.placeholder = isNum(v) ? "" : "unset";
  }

  if (useRange) {
    range = el("input", { type: "range", id: id, min: min, max: max, step: step, title: title });
    field.className = "num";
    row.appendChild(range);
    row.appendChild(field);
    var fromRange = function () {
      var v = isInt ? parseInt(range.value, 10) : parseFloat(range.value);
      return isNum(v) ? v : null;
    };
    range.addEventListener("pointerdown", function () { dragging = name; touch(name); });
    range.addEventListener("keydown", function () { touch(name); });
    range.addEventListener("input", function () {
      var v = fromRange();
      touch(name);
      if (v !== null) { show(v); send(name, v, false); }
    });
    range.addEventListener("change", function () {
      var v = fromRange();
      touch(name);
      if (v !== null) { show(v); send(name, v, true); }
    });
  } else {
    field.id = id;
    field.className = "span";
    row.appendChild(field);
  }
  control.blocking.push(field);
  field.addEventListener("input", function () { touch(name); });
  field.addEventListener("change", function () {
    touch(name);
    var v = readNumber(field.value, isInt);
    if (v === null) {
      showError(name + ": enter " + (isInt ? "a whole number" : "a number")
        + (typeof p.allowed === "string" ? " (" + p.allowed + ")" : ""));
      return;
    }
    if (range) { range.value = String(v); }
    send(name, v, false);
  });
  field.addEventListener("keydown", function (event) {
    if (event.key === "Enter") { field.blur(); }
  });
  control.set = function (v) {
    var n = isNum(v) ? v : null;
    if (range) { range.value = String(n === null ? min : n); }
    show(n);
  };
  return control;
}

function boolControl(p, row, id, title) {
  var box = el("input", { type: "checkbox", id: id, title: title, "class": "span" });
  row.appendChild(box);
  box.addEventListener("pointerdown", function () { touch(p.name); });
  box.addEventListener("change", function () { touch(p.name); send(p.name, box.checked, false); });
  return {
    blocking: [],
    set: function (v) { box.checked = v === true; row.classList.toggle("unset", typeof v !== "boolean"); }
  };
}

function enumControl(p, row, id, title) {
  var select = el("select", { id: id, title: title, "class": "span" });
  (Array.isArray(p.choices) ? p.choices : []).forEach(function (choice) {
    select.appendChild(el("option", { value: String(choice) }, String(choice)));
  });
  row.appendChild(select);
  select.addEventListener("pointerdown", function () { touch(p.name); });
  select.addEventListener("change", function () { touch(p.name); send(p.name, select.value, false); });
  return {
    blocking: [],
    set: function (v) {
      var text = v === null || v === undefined ? "" : String(v);
      if (select.value !== text) { select.value = text; }
      if (select.value !== text) { select.selectedIndex = -1; }
      row.classList.toggle("unset", v === null || v === undefined);
    }
  };
}

var PLACEHOLDERS = {
  int_list: "e.g. 32 45", float_list: "e.g. 0.5 1", size: "e.g. 512x512",
  prompt_blend: "e.g. a cat: 0.5 | a dog: 0.5", seed_blend: "e.g. 1: 0.5 | 2: 0.5"
};

// A text field (string, lists, size, blends; JSON for a type this page does not know):
// sent on Enter, or on leaving the field when it changed; Escape reverts.
function textControl(p, row, id, title) {
  var name = p.name;
  var type = p.type;
  var input = el("input", {
    type: "text", id: id, title: title, "class": "span", autocomplete: "off", autocapitalize: "off",
    spellcheck: type === "string" ? "true" : "false",
    placeholder: PLACEHOLDERS[type] || (typeof p.allowed === "string" ? p.allowed : "")
  });
  var control = { blocking: [input], synced: "" };
  row.appendChild(input);
  function commit() {
    var parsed = parseText(type, input.value);
    if (parsed.skip) { return; }
    if (has(parsed, "error")) { showError(name + ": " + parsed.error); return; }
    control.synced = input.value;
    send(name, parsed.value, false);
  }
  input.addEventListener("input", function () { touch(name); });
  input.addEventListener("keydown", function (event) {
    touch(name);
    if (event.key === "Enter") { event.preventDefault(); commit(); }
    else if (event.key === "Escape") { input.value = control.synced; input.blur(); }
  });
  input.addEventListener("blur", function () {
    if (input.value !== control.synced) { touch(name); commit(); }
  });
  control.set = function (v) {
    var text = formatValue(type, v);
    if (input.value !== text) { input.value = text; }
    control.synced = text;
    row.classList.toggle("unset", v === null || v === undefined);
  };
  return control;
}

function makeRow(p) {
  var id = "param-" + p.name;
  var doc = typeof p.doc === "string" ? p.doc : "";
  var allowed = typeof p.allowed === "string" ? p.allowed : "";
  var row = el("div", { "class": "row", "data-name": p.name });
  var labelTitle = doc + (allowed ? "\nallowed: " + allowed : "")
    + (typeof p.osc_address === "string" ? "\nOSC: " + p.osc_address + " " + (p.osc_args || "") : "");
  row.appendChild(el("label", { "for": id, title: labelTitle }, p.name));
  var control;
  if (p.type === "float" || p.type === "int") { control = numberControl(p, row, id, doc); }
  else if (p.type === "bool") { control = boolControl(p, row, id, doc); }
  else if (p.type === "enum") { control = enumControl(p, row, id, doc); }
  else { control = textControl(p, row, id, doc); }
  control.row = row;
  control.set(has(p, "default") ? p.default : null);
  return control;
}

function buildControls(params) {
  var container = $("controls");
  var order = [];
  var groups = {};
  params.forEach(function (p) {
    if (!isObj(p) || typeof p.name !== "string" || !p.name || p.type === "action") { return; }
    if (has(controls, p.name)) { return; }
    var group = typeof p.group === "string" && p.group ? p.group : "other";
    if (!has(groups, group)) { groups[group] = []; order.push(group); }
    groups[group].push(p);
  });
  container.textContent = "";
  order.forEach(function (group) {
    var details = el("details", { "class": "group", id: "group-" + group, open: "" });
    var summary = el("summary");
    summary.appendChild(el("h2", null, titleCase(group)));
    details.appendChild(summary);
    var rows = el("div", { "class": "rows" });
    groups[group].forEach(function (p) {
      try {
        var control = makeRow(p);
        controls[p.name] = control;
        rows.appendChild(control.row);
      } catch { /* one odd entry must not cost the whole page */ }
    });
    details.appendChild(rows);
    container.appendChild(details);
  });
  if (!order.length) { container.appendChild(el("div", { "class": "note" }, "no parameters")); }
  if (lastValues) { applyValues(lastValues); }
  markLearn();
}

function loadSpec() {
  request(API.spec).then(function (body) {
    if (!Array.isArray(body.params)) { throw new Error("the spec has no parameter list"); }
    buildControls(body.params);
  }).catch(function (err) {
    var note = $("controls-note");
    if (note) { note.textContent = "loading parameters: " + err.message + "; retrying"; }
    setTimeout(loadSpec, SPEC_RETRY_MS);
  });
}

window.addEventListener("pointerup", function () {
  if (dragging !== null) { touch(dragging); dragging = null; }
});
window.addEventListener("pointercancel", function () {
  if (dragging !== null) { touch(dragging); dragging = null; }
});

// ------------------------------------------------------------------ state
function busy(name) {
  var control = controls[name];
  if (dragging === name || pending(name)) { return true; }
  if (now() - (touched[name] || 0) < HOLD_MS) { return true; }
  return control.blocking.indexOf(document.activeElement) >= 0;
}

function applyValues(values) {
  Object.keys(controls).forEach(function (name) {
    if (!has(values, name) || busy(name)) { return; }
    try { controls[name].set(values[name]); } catch { /* leave this control as it is */ }
  });
}

var statusLine = $("status");
function statusItem(label, value, cls) {
  var item = el("span", cls ? { "class": cls } : null);
  item.appendChild(el("b", null, label + " "));
  item.appendChild(document.createTextNode(value));
  statusLine.appendChild(item);
}

function renderStatus(st) {
  var state = typeof st.state === "string" && st.state ? st.state : "-";
  statusLine.textContent = "";
  statusItem("state", state, BAD_STATES.indexOf(state) >= 0 ? "bad" : (state === "running" ? "good" : ""));
  statusItem("fps", isNum(st.fps) ? st.fps.toFixed(1) : "-");
  statusItem("latency", isNum(st.latency_ms) ? Math.round(st.latency_ms) + " ms" : "-");
  statusItem("skip", isNum(st.skip_rate) ? (st.skip_rate * 100).toFixed(1) + "%" : "-");
  if (isNum(st.replicas_configured) && st.replicas_configured > 1 && isNum(st.replicas)) {
    var short = st.replicas < st.replicas_configured;
    statusItem("replicas", st.replicas + "/" + st.replicas_configured, short ? "bad" : "");
  }
  if (typeof st.error === "string" && st.error) { statusItem("error", st.error, "bad"); }
}

function renderUnreachable(err) {
  statusLine.textContent = "";
  var detail = err && err.status && err.message ? ": " + err.message : "";
  statusLine.appendChild(el("span", { "class": "bad" }, "engine not reachable" + detail));
}

function showJson(pre, data) {
  var text;
  try { text = JSON.stringify(data, null, 2); } catch { text = String(data); }
  if (pre.textContent !== text) { pre.textContent = text; }
}

// The engine's state as pushed (arrived at performance.now() `at`): values, status and scenes.
function showState(body, at) {
  var values = isObj(body.values) ? body.values : {};
  var st = isObj(body.status) ? body.status : {};
  if (online === false) { streams.forEach(function (s) { s.reconnect(); }); }
  online = true;
  document.body.classList.remove("offline");
  lastValues = values;
  applyValues(values);
  renderStatus(st);
  showTempo(st, body.time, at);
  renderScenes(Array.isArray(body.scenes) ? body.scenes : []);
  renderMidi(has(body, "midi") ? body.midi : null);
  showSources(has(body, "sources") ? body.sources : null, values, st);
  showJson($("values"), values);
  showJson($("status-json"), st);
}

function showOffline(err) {
  online = false;
  document.body.classList.add("offline");
  renderUnreachable(err);
  showTempo({}, null, 0);
}

// ------------------------------------------------------------------ scenes
var sceneName = $("scene-name");
var sceneSave = $("scene-save");
var sceneNote = $("scene-note");
var sceneList = $("scenes");
var sceneListKey = null;

function markScenes() {
  var name = sceneName.value.trim();
  Array.prototype.forEach.call(sceneList.querySelectorAll("button"), function (button) {
    button.classList.toggle("current", button.textContent === name);
  });
  sceneSave.textContent = knownScenes.indexOf(name) >= 0 ? "overwrite" : "save";
}

function renderScenes(names) {
  var clean = names.filter(function (n) { return typeof n === "string" && n; });
  var key = JSON.stringify(clean);
  if (key === sceneListKey) { return; }
  sceneListKey = key;
  knownScenes = clean;
  sceneList.textContent = "";
  if (!clean.length) { sceneList.appendChild(el("li", { "class": "note" }, "no scenes saved yet")); }
  clean.forEach(function (name) {
    var item = el("li");
    var button = el("button", { type: "button", "class": "scene", title: "pick " + name }, name);
    button.addEventListener("click", function () {
      if (learnClick("preset_load", name)) { return; }
      sceneName.value = name;
      markScenes();
    });
    item.appendChild(button);
    sceneList.appendChild(item);
  });
  markScenes();
  markLearn();
}

function sceneAction(action, doing, done) {
  var name = sceneName.value.trim();
  if (!name) { showError("scene: enter a name (or pick one from the list) first"); return; }
  if (learnClick(action, name)) { return; }
  sceneNote.textContent = doing + " " + name + "\u2026";
  post(action, name).then(function (ok) {
    var text = ok ? done + " " + name : "";
    sceneNote.textContent = text;
    if (ok) {
      setTimeout(function () { if (sceneNote.textContent === text) { sceneNote.textContent = ""; } }, 4000);
    }
  });
}

sceneName.addEventListener("input", markScenes);
sceneSave.addEventListener("click", function () { sceneAction("preset_save", "saving", "saved"); });
$("scene-load").addEventListener("click", function () { sceneAction("preset_load", "loading", "loaded"); });

// ------------------------------------------------------------------ tempo
// The status has the musical time: beat_position at beat_time on the server's clock (not this
// browser's) and bpm. Each state re-anchors the beat to performance.now() at its arrival (moved
// on from beat_time to the state's time, when it was read); in between it runs on at bpm.
var MAX_DOTS = 32;         // beats_per_bar's maximum
var tempoTap = $("tempo-tap");
var tempoBpm = $("tempo-bpm");
var beatDots = $("beats");
var tempoStep = $("tempo-step");
var beat = null;           // {position, bpm, perBar, at}: the beat position at performance.now() `at`
var beatFrame = null;      // the pending animation frame
var litDot = -1;
var tapFlash = null;

// The anchor a status arriving at `at` gives (null without musical time); `serverTime` is the
// state's time, on beat_time's clock.
function beatAnchor(st, serverTime, at) {
  if (!isNum(st.bpm) || st.bpm <= 0 || !isNum(st.beat_position)) { return null; }
  var position = st.beat_position;
  if (isNum(serverTime) && isNum(st.beat_time) && serverTime > st.beat_time) {
    position += (serverTime - st.beat_time) * st.bpm / 60;
  }
  var perBar = isNum(st.beats_per_bar) && st.beats_per_bar >= 1
    ? Math.min(Math.round(st.beats_per_bar), MAX_DOTS) : 4;
  return { position: position, bpm: st.bpm, perBar: perBar, at: at };
}

// The beat of the bar (0: the downbeat) at performance.now() `t`.
function beatIndex(anchor, t) {
  var whole = Math.floor(anchor.position + (t - anchor.at) / 1000 * anchor.bpm / 60 + 1e-6);
  return ((whole % anchor.perBar) + anchor.perBar) % anchor.perBar;
}

function drawBeat() {
  beatFrame = null;
  if (beat === null) { return; }
  if (beatDots.childNodes.length !== beat.perBar) {
    beatDots.textContent = "";
    for (var i = 0; i < beat.perBar; i += 1) {
      beatDots.appendChild(el("i", { "class": i === 0 ? "down" : null, title: "beat " + (i + 1) }));
    }
    litDot = -1;
  }
  var index = beatIndex(beat, performance.now());
  if (index !== litDot) {
    Array.prototype.forEach.call(beatDots.childNodes, function (dot, j) {
      dot.classList.toggle("on", j === index);
    });
    litDot = index;
  }
  beatFrame = requestAnimationFrame(drawBeat);
}

function showTempo(st, serverTime, at) {
  beat = beatAnchor(st, serverTime, at);
  var bpm = beat ? beat.bpm.toFixed(1) : "-";
  if (tempoBpm.textContent !== bpm) { tempoBpm.textContent = bpm; }
  var step = isNum(st.sequence_step) && st.sequence_step >= 0
    ? "sequence step " + Math.round(st.sequence_step) : "";
  if (tempoStep.textContent !== step) { tempoStep.textContent = step; }
  if (beat === null) {
    beatDots.textContent = "";
    litDot = -1;
  } else if (beatFrame === null) {
    beatFrame = requestAnimationFrame(drawBeat);
  }
}

// Taps are sent at once, each one (no throttle: the engine stamps them on arrival).
function tap() {
  tempoTap.classList.add("hit");
  if (tapFlash !== null) { clearTimeout(tapFlash); }
  tapFlash = setTimeout(function () { tapFlash = null; tempoTap.classList.remove("hit"); }, 100);
  post("tempo_tap", null);
}

function resync() {
  var at = performance.now();
  post("tempo_resync", null).then(function (ok) {
    // the engine's next status says so too; until then, the click was the downbeat
    if (ok && beat !== null) { beat = { position: 0, bpm: beat.bpm, perBar: beat.perBar, at: at }; }
  });
}

// Where the space bar types: it taps everywhere else.
var NOT_TEXT = ["button", "checkbox", "color", "file", "image", "radio", "range", "reset", "submit"];
function typing(node) {
  if (!node || node.nodeType !== 1) { return false; }
  if (node.isContentEditable || node.tagName === "TEXTAREA") { return true; }
  return node.tagName === "INPUT" && NOT_TEXT.indexOf(String(node.type).toLowerCase()) < 0;
}

function isSpace(event) { return event.key === " " || event.code === "Space"; }

tempoTap.addEventListener("pointerdown", function (event) {
  // on the press, not the release: the beat is the press
  if (event.button === 0 && !learnClick("tempo_tap", null)) { tap(); }
});
tempoTap.addEventListener("click", function (event) {
  // Enter on the focused button (a pointer tapped on its press)
  if (event.detail === 0 && !learnClick("tempo_tap", null)) { tap(); }
});
$("tempo-resync").addEventListener("click", function () {
  if (!learnClick("tempo_resync", null)) { resync(); }
});
window.addEventListener("keydown", function (event) {
  if (!isSpace(event) || event.ctrlKey || event.altKey || event.metaKey || typing(event.target)) { return; }
  event.preventDefault();  // no scrolling, no focused button pressed, no checkbox toggled
  if (!event.repeat) { tap(); }
});
window.addEventListener("keyup", function (event) {
  if (isSpace(event) && !typing(event.target)) { event.preventDefault(); }  // a button clicks on keyup
});

// ------------------------------------------------------------------ MIDI
// The MIDI service's panel as pushed (null: MIDI is off): its status line, each controller and
// its bindings (each with a forget), and a learn waiting for a control. LEARN is a toggle, as in
// Resolume or VDMX: while it is on, what a controller can play is marked and a click on it sends
// midi_learn (a parameter's name, a scene, TAP, RESYNC, load / save with the scene name typed);
// the next control moved on a controller is bound to it. The target stays lit while the service
// waits; the list shows the new binding from the state pushed once the mapping file is saved.
var midiBlock = $("midi-block");
var midiBar = $("midi-bar");
var midiLearnButton = $("midi-learn");
var midiLearning = $("midi-learning");
var midiCancel = $("midi-cancel");
var midiStatus = $("midi-status");
var midiList = $("midi-controllers");
var FRESH_MS = 4000;       // a binding just learnt is lit this long
var midi = null;           // the panel as last pushed (null: MIDI is off)
var learnMode = false;     // the LEARN toggle
var bindableNames = [];    // what a binding may drive (the panel's bindable)
var midiListKey = null;
var midiMarkKey = null;
var knownBindings = null;  // the keys of the bindings listed, to light the new ones

function argumentOf(value) { return value === undefined ? null : value; }
function sameJson(a, b) { return JSON.stringify(argumentOf(a)) === JSON.stringify(argumentOf(b)); }
function canLearn(target) { return midi !== null && bindableNames.indexOf(target) >= 0; }
function learning() { return midi !== null && isObj(midi.learning) ? midi.learning : null; }

function isLearning(target, argument) {
  var now = learning();
  return now !== null && now.target === target && sameJson(now.argument, argument);
}

// What /midi/learn and /midi/forget take: the target, then its argument when it has one.
function targetArgs(target, argument) {
  return argument === null || argument === undefined ? [target] : [target, argument];
}

function argumentText(argument) {
  if (argument === null || argument === undefined) { return ""; }
  return Array.isArray(argument) ? "[" + argument.map(String).join(", ") + "]" : String(argument);
}

// A click on `target` (with its argument) while LEARN is on: learn it (the one waiting again:
// stop); whether the click was used for that.
function learnClick(target, argument) {
  if (!learnMode || !canLearn(target)) { return false; }
  if (isLearning(target, argument)) { post("midi_cancel", null); }
  else { post("midi_learn", targetArgs(target, argument)); }
  return true;
}

function setLearnMode(on) {
  var next = Boolean(on) && midi !== null;
  if (!next && learnMode && learning() !== null) { post("midi_cancel", null); }  // LEARN off stops it
  learnMode = next;
  document.body.classList.toggle("midi-learn", learnMode);
  midiLearnButton.setAttribute("aria-pressed", learnMode ? "true" : "false");
  midiLearnButton.classList.toggle("on", learnMode);
  midiMarkKey = null;
  markLearn();
}

// The classes LEARN shows: learnable (a click learns `target`), learning (lit: it is waited for).
function markNode(node, target, lit) {
  node.classList.toggle("learnable", canLearn(target));
  node.classList.toggle("learning", lit);
  return lit;
}

function markLearn() {
  var now = learning();
  Object.keys(controls).forEach(function (name) {
    markNode(controls[name].row, name, isLearning(name, null));
  });
  var listed = false;  // a scene load waited for lights its scene, else the load button
  Array.prototype.forEach.call(sceneList.querySelectorAll("button.scene"), function (button) {
    listed = markNode(button, "preset_load", isLearning("preset_load", button.textContent)) || listed;
  });
  markNode($("scene-load"), "preset_load", !listed && now !== null && now.target === "preset_load");
  markNode($("scene-save"), "preset_save", now !== null && now.target === "preset_save");
  markNode(tempoTap, "tempo_tap", isLearning("tempo_tap", null));
  markNode($("tempo-resync"), "tempo_resync", isLearning("tempo_resync", null));

  midiLearning.textContent = "";
  if (now !== null) {
    midiLearning.appendChild(document.createTextNode("move a control to bind "));
    var shown = String(now.target) + (argumentText(now.argument) ? " " + argumentText(now.argument) : "");
    midiLearning.appendChild(el("b", null, shown));
  } else if (learnMode) {
    midiLearning.textContent = "click what to learn: a parameter's name, a scene, TAP, RESYNC";
  }
  midiCancel.hidden = now === null;
}

function bindingItem(controller, b, index, seen) {
  var target = String(b.to);
  var argument = argumentOf(b.argument);
  var key = JSON.stringify([controller.mapping, b.source, target, argument]);
  var item = el("li", { "class": "midi-binding", "data-target": target });
  item.appendChild(el("span", { "class": "midi-source", title: "what the controller plays" }, b.source));
  var to = el("span", { "class": "midi-to" }, "\u2192 " + target);
  if (argumentText(argument)) {
    to.appendChild(document.createTextNode(" "));
    to.appendChild(el("i", null, argumentText(argument)));
  }
  item.appendChild(to);
  item.appendChild(el("small", { "class": "midi-mode" }, typeof b.mode === "string" ? b.mode : ""));
  var forget = el("button", {
    type: "button", "class": "midi-forget", title: "remove this binding from " + controller.mapping + ".yaml"
  }, "forget");
  // this one binding, by its mapping and its place in the file (/midi/unbind s mapping i index)
  forget.addEventListener("click", function () { post("midi_unbind", [controller.mapping, index]); });
  item.appendChild(forget);
  if (knownBindings !== null && !has(knownBindings, key)) {  // just learnt
    item.classList.add("fresh");
    setTimeout(function () { item.classList.remove("fresh"); }, FRESH_MS);
  }
  seen[key] = true;
  return item;
}

function renderControllers(controllers) {
  var key = JSON.stringify(controllers);
  if (key === midiListKey) { return; }  // unchanged: no rebuild under the pointer
  midiListKey = key;
  var seen = {};
  midiList.textContent = "";
  controllers.forEach(function (c) {
    if (!isObj(c)) { return; }
    var box = el("div", { "class": "midi-controller" });
    var head = el("div", { "class": "midi-head" });
    head.appendChild(el("b", null, c.mapping));
    head.appendChild(c.connected === true
      ? el("span", { "class": "good", title: "its input port" }, "connected" + (c.port ? ": " + c.port : ""))
      : el("span", { "class": "bad", title: "an input port whose name starts so" }, "waiting for " + c.input));
    if (typeof c.profile === "string" && c.profile) { head.appendChild(el("small", null, "profile " + c.profile)); }
    box.appendChild(head);
    var list = el("ul", { "class": "midi-bindings" });
    var bindings = (Array.isArray(c.bindings) ? c.bindings : []).filter(isObj);
    if (!bindings.length) { list.appendChild(el("li", { "class": "note" }, "no bindings yet: LEARN one")); }
    bindings.forEach(function (b, index) { list.appendChild(bindingItem(c, b, index, seen)); });
    box.appendChild(list);
    midiList.appendChild(box);
  });
  if (!controllers.length && midi !== null) {
    midiList.appendChild(el("div", { "class": "note" }, "no controller: name a mapping in midi.mappings"));
  }
  knownBindings = midi === null ? null : seen;
}

function renderMidi(panel) {
  midi = isObj(panel) ? panel : null;
  midiBlock.hidden = false;
  midiBar.hidden = midi === null;
  bindableNames = midi !== null && Array.isArray(midi.bindable)
    ? midi.bindable.filter(function (n) { return typeof n === "string"; }) : [];
  if (midi === null && learnMode) { setLearnMode(false); }
  var status = midi === null ? "MIDI off: set midi.mappings in config.yaml"
    : (typeof midi.status === "string" ? midi.status : "");
  if (midiStatus.textContent !== status) { midiStatus.textContent = status; }
  midiStatus.classList.toggle("note", midi === null);
  renderControllers(midi !== null && Array.isArray(midi.controllers) ? midi.controllers : []);
  var key = JSON.stringify([learning(), bindableNames]);
  if (key !== midiMarkKey) { midiMarkKey = key; markLearn(); }
}

midiLearnButton.addEventListener("click", function () { setLearnMode(!learnMode); });
midiCancel.addEventListener("click", function () { post("midi_cancel", null); });
// In LEARN, a parameter's name learns it (and does not focus or toggle its control).
$("controls").addEventListener("click", function (event) {
  if (!learnMode || !event.target || typeof event.target.closest !== "function") { return; }
  var label = event.target.closest(".row > label");
  if (label && learnClick(label.parentNode.dataset.name, null)) { event.preventDefault(); }
});
// Escape (outside a text field): stop the learn waiting, else leave LEARN.
window.addEventListener("keydown", function (event) {
  if (event.key !== "Escape" || typing(event.target)) { return; }
  if (learning() !== null) { post("midi_cancel", null); }
  else if (learnMode) { setLearnMode(false); }
});

// ------------------------------------------------------------------ sources
// The source catalogue as pushed (state.sources, null where the engine lists none): each source
// with play (posts input_source: the engine opens it beside the one playing and swaps them once
// it sent a frame), the one playing (values.input_source) marked. A switch shows from the click
// until the echo, a refusal (status.last_error naming input_source) or SWITCH_WAIT_MS. refresh
// posts the action input_sources: the catalogue looks again and the next state has the new look.
// With thumbnails on, the listed sources' pictures are asked for one after another, a round
// every THUMB_EVERY_MS (a source not playing is opened for a moment on the engine's side).
var sourcePlaying = $("source-playing");
var sourceList = $("sources");
var sourceThumbs = $("source-thumbs");
var sourceRefresh = $("source-refresh");
var sourceAge = $("source-age");
var sourceFade = $("source-fade");
var sourceUnavailable = $("source-unavailable");
var THUMBNAIL_PATH = "/api/source-thumbnail";
var SWITCH_WAIT_MS = 12000;  // the engine refuses a source that sent no frame within 10 s
var THUMB_EVERY_MS = 2000;
var LOOK_WAIT_MS = 5000;     // refresh shows "looking" until a newer look arrives, at most this long
var catalogue = null;        // state.sources as last pushed
var playing = null;          // values.input_source
var switching = null;        // {name, from, error, at}: play clicked, the switch not echoed yet
var switchFailed = null;     // {name, text}: the engine refused the last switch
var looking = null;          // {at, age}: refresh clicked, no newer look yet
var sourceListKey = null;
var playingKey = null;
var sourceItems = {};        // name -> {item, button, img, note}
var thumbsOn = false;
var thumbRound = 0;          // bumped to stop the round under way
var thumbTimer = null;
var thumbs = {};             // name -> {url} | {note}: the last answer (kept across list rebuilds)
var lastStatus = {};         // the status as last pushed (its last_error tells a refused switch)

function listedSources() {
  var list = catalogue !== null && Array.isArray(catalogue.sources) ? catalogue.sources : [];
  return list.filter(function (s) { return isObj(s) && typeof s.name === "string" && s.name; });
}

function sourceLabel(name) {
  var found = listedSources().filter(function (s) { return s.name === name; })[0];
  return found && typeof found.label === "string" && found.label && found.label !== name ? found.label : "";
}

function play(name) {
  if (name === playing && switching === null) { return; }
  switching = { name: name, from: playing, error: lastError(), at: now() };
  switchFailed = null;
  markSources();
  post("input_source", name).then(function (ok) {
    if (!ok && switching !== null && switching.name === name) { switching = null; markSources(); }
  });
}

function lastError() { return typeof lastStatus.last_error === "string" ? lastStatus.last_error : null; }

function sourceItem(s) {
  var name = s.name;
  var item = el("li", { "class": "source", "data-name": name });
  var pic = el("div", { "class": "source-pic" });
  var img = el("img", { "class": "source-thumb", alt: "" });
  var note = el("small", { "class": "source-thumb-note" });
  pic.appendChild(img);
  pic.appendChild(note);
  item.appendChild(pic);
  var text = el("div", { "class": "source-text" });
  var label = typeof s.label === "string" && s.label ? s.label : name;
  text.appendChild(el("b", { "class": "source-label" }, label));
  text.appendChild(el("span", { "class": "source-name" }, name));
  if (typeof s.detail === "string" && s.detail) {
    text.appendChild(el("small", { "class": "source-detail" }, s.detail));
  }
  item.appendChild(text);
  var button = el("button", { type: "button", "class": "source-play", title: "switch the main input to " + name },
    "play");
  button.addEventListener("click", function () { play(name); });
  item.appendChild(button);
  sourceItems[name] = { item: item, button: button, img: img, note: note };
  showThumb(name);
  return item;
}

function renderSourceList() {
  var sources = listedSources();
  var key = JSON.stringify([catalogue === null, sources]);
  if (key === sourceListKey) { return; }  // unchanged: no rebuild under the pointer
  sourceListKey = key;
  sourceItems = {};
  sourceList.textContent = "";
  if (catalogue === null) {
    sourceList.appendChild(el("li", { "class": "note" }, "this engine lists no sources"));
    return;
  }
  if (!sources.length) { sourceList.appendChild(el("li", { "class": "note" }, "no sources found")); }
  sources.forEach(function (s) { sourceList.appendChild(sourceItem(s)); });
}

function markSources() {
  Object.keys(sourceItems).forEach(function (name) {
    var entry = sourceItems[name];
    var isPlaying = name === playing;
    var isOpening = switching !== null && switching.name === name;
    entry.item.classList.toggle("playing", isPlaying);
    entry.item.classList.toggle("switching", isOpening);
    entry.button.disabled = isOpening || (isPlaying && switching === null);
    var text = isOpening ? "opening\u2026" : (isPlaying ? "playing" : "play");
    if (entry.button.textContent !== text) { entry.button.textContent = text; }
  });
  var label = playing !== null ? sourceLabel(playing) : "";
  var key = JSON.stringify([switching && switching.name, switchFailed, playing, label]);
  if (key === playingKey) { return; }  // unchanged: nothing re-announced
  playingKey = key;
  sourcePlaying.textContent = "";
  sourcePlaying.classList.toggle("bad", switchFailed !== null && switching === null);
  if (switching !== null) {
    sourcePlaying.appendChild(document.createTextNode("switching to "));
    sourcePlaying.appendChild(el("b", null, switching.name));
    sourcePlaying.appendChild(document.createTextNode("\u2026"));
  } else if (switchFailed !== null) {
    sourcePlaying.textContent = switchFailed.text;
  } else if (playing !== null) {
    sourcePlaying.appendChild(document.createTextNode("playing "));
    sourcePlaying.appendChild(el("b", null, playing));
    if (label) { sourcePlaying.appendChild(el("small", null, " " + label)); }
  }
}

function showSources(data, values, st) {
  catalogue = isObj(data) ? data : null;
  lastStatus = st;
  var was = playing;
  playing = typeof values.input_source === "string" ? values.input_source : null;
  if (was !== playing) { switchFailed = null; }
  var error = lastError();
  if (switching !== null) {
    if (playing !== switching.from) {
      switching = null;  // switched (or another switch came first)
    } else if (error !== null && error !== switching.error && error.indexOf("input_source") === 0) {
      switchFailed = { name: switching.name, text: error };
      switching = null;
    } else if (now() - switching.at > SWITCH_WAIT_MS) {  // e.g. refused with the same words again
      var named = error !== null && error.indexOf("input_source") === 0 && error.indexOf(switching.name) >= 0;
      var text = named ? error : "not switched to " + switching.name
        + (error !== null ? "; the engine's last error: " + error : "");
      switchFailed = { name: switching.name, text: text };
      switching = null;
    }
  }
  var listing = catalogue !== null;
  sourceRefresh.hidden = !listing;
  sourceThumbs.hidden = !listing;
  if (!listing && thumbsOn) { setThumbs(false); }
  renderSourceList();
  markSources();
  var age = catalogue !== null && isNum(catalogue.age_s) ? catalogue.age_s : null;
  if (looking !== null && ((age !== null && (looking.age === null || age < looking.age))
    || now() - looking.at > LOOK_WAIT_MS)) { looking = null; }
  var ageText = !listing ? "" : (looking !== null || age === null ? "looking\u2026"
    : "looked " + Math.round(age) + " s ago");
  if (sourceAge.textContent !== ageText) { sourceAge.textContent = ageText; }
  var fade = isNum(values.input_crossfade) && values.input_crossfade > 0
    ? "switches crossfade " + Math.round(values.input_crossfade) + " frames" : "switches cut";
  if (sourceFade.textContent !== fade) { sourceFade.textContent = fade; }
  renderUnavailable(catalogue !== null && isObj(catalogue.unavailable) ? catalogue.unavailable : {});
}

var unavailableKey = null;
function renderUnavailable(kinds) {
  var key = JSON.stringify(kinds);
  if (key === unavailableKey) { return; }
  unavailableKey = key;
  sourceUnavailable.textContent = "";
  Object.keys(kinds).forEach(function (kind) {
    var item = el("li");
    item.appendChild(el("b", null, kind + " "));
    item.appendChild(document.createTextNode(String(kinds[kind])));
    sourceUnavailable.appendChild(item);
  });
}

sourceRefresh.addEventListener("click", function () {
  var age = catalogue !== null && isNum(catalogue.age_s) ? catalogue.age_s : null;
  looking = { at: now(), age: age };
  sourceAge.textContent = "looking\u2026";
  post("input_sources", null).then(function (ok) { if (!ok) { looking = null; } });
});

// -- thumbnails: JPEGs fetched as data: URLs (the page's CSP allows those, not blob:)
function dataUrl(blob) {
  return new Promise(function (resolve, reject) {
    var reader = new FileReader();
    reader.addEventListener("load", function () { resolve(String(reader.result)); });
    reader.addEventListener("error", function () { reject(reader.error); });
    reader.readAsDataURL(blob);
  });
}

function errorText(response) {
  return response.text().then(function (text) {
    var body;
    try { body = JSON.parse(text); } catch { body = null; }
    return { note: isObj(body) && typeof body.error === "string" ? body.error : "HTTP " + response.status };
  }, function () { return { note: "HTTP " + response.status }; });
}

function fetchThumb(name) {
  var controller = typeof AbortController === "function" ? new AbortController() : null;
  var timer = controller ? setTimeout(function () { controller.abort(); }, TIMEOUT_MS) : null;
  var options = { cache: "no-store" };
  if (controller) { options.signal = controller.signal; }
  return fetch(THUMBNAIL_PATH + "?name=" + encodeURIComponent(name), options).then(function (response) {
    if (response.status === 204) { return { note: "no frame" }; }
    if (!response.ok) { return errorText(response); }
    return response.blob().then(dataUrl).then(function (url) { return { url: url }; });
  }).catch(function () {
    return { note: "no answer" };
  }).finally(function () {
    if (timer !== null) { clearTimeout(timer); }
  });
}

function showThumb(name) {
  var entry = sourceItems[name];
  var got = thumbs[name];
  if (!entry) { return; }
  var url = got && typeof got.url === "string" ? got.url : "";
  if (url && entry.img.getAttribute("src") !== url) { entry.img.src = url; }
  if (!url) { entry.img.removeAttribute("src"); }
  entry.img.hidden = !url;
  var note = got && typeof got.note === "string" ? got.note : (got ? "" : "\u2026");
  entry.note.textContent = note;
  entry.note.title = note;
}

function thumbnailRound() {
  thumbTimer = null;
  if (!thumbsOn || document.hidden) { return; }
  var round = thumbRound;
  var started = now();
  var names = listedSources().map(function (s) { return s.name; });
  var index = 0;
  function next() {
    if (round !== thumbRound) { return; }
    if (index >= names.length) {
      thumbTimer = setTimeout(thumbnailRound, Math.max(0, THUMB_EVERY_MS - (now() - started)));
      return;
    }
    var name = names[index];
    index += 1;
    fetchThumb(name).then(function (result) {
      if (round !== thumbRound) { return; }
      thumbs[name] = result;
      showThumb(name);
      next();
    });
  }
  next();
}

function stopThumbs() {
  thumbRound += 1;
  if (thumbTimer !== null) { clearTimeout(thumbTimer); thumbTimer = null; }
}

function setThumbs(on) {
  thumbsOn = Boolean(on);
  stopThumbs();
  sourceThumbs.setAttribute("aria-pressed", thumbsOn ? "true" : "false");
  sourceThumbs.classList.toggle("on", thumbsOn);
  sourceList.classList.toggle("thumbs", thumbsOn);
  if (thumbsOn) { thumbnailRound(); }
}

sourceThumbs.addEventListener("click", function () { setThumbs(!thumbsOn); });
// A hidden tab asks for no thumbnails (each may open a source on the engine's side).
document.addEventListener("visibilitychange", function () {
  stopThumbs();
  if (!document.hidden && thumbsOn) { thumbnailRound(); }
});

// ------------------------------------------------------------------ video
function Stream(img, path) {
  var timer = null;
  var paused = false;
  function connect() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (!paused) { img.src = path + "?t=" + now(); }
  }
  function later() {
    if (paused || timer !== null) { return; }
    timer = setTimeout(connect, 1000);  // the engine restarted or the stream ended
  }
  img.addEventListener("error", later);
  img.addEventListener("dblclick", function () { toggleFullscreen(img); });
  if (img.complete && !img.naturalWidth) { later(); }  // failed before this script ran
  return {
    reconnect: connect,
    pause: function () {
      paused = true;
      if (timer !== null) { clearTimeout(timer); timer = null; }
      img.removeAttribute("src");
    },
    resume: function () { paused = false; connect(); }
  };
}

function toggleFullscreen(node) {
  var doc = document;
  var result = null;
  try {
    if (doc.fullscreenElement || doc.webkitFullscreenElement) {
      result = doc.exitFullscreen ? doc.exitFullscreen() : doc.webkitExitFullscreen();
    } else if (node.requestFullscreen) {
      result = node.requestFullscreen();
    } else if (node.webkitRequestFullscreen) {
      result = node.webkitRequestFullscreen();
    }
  } catch { result = null; }
  if (result && typeof result.catch === "function") { result.catch(noop); }
}

var streams = [Stream($("input"), "/input.mjpg"), Stream($("output"), "/stream.mjpg")];
// A hidden tab lets go of its two streams (browsers allow only a few connections per server).
document.addEventListener("visibilitychange", function () {
  streams.forEach(function (s) { if (document.hidden) { s.pause(); } else { s.resume(); } });
});

// ------------------------------------------------------------------ plot
var canvas = $("plot");
var legend = $("legend");

function niceCeil(v, floor) {
  var top = Math.max(isNum(v) ? v : 0, floor);
  var p = Math.pow(10, Math.floor(Math.log10(top)));
  var steps = [1, 2, 2.5, 5, 10];
  for (var i = 0; i < steps.length; i += 1) {
    if (top <= steps[i] * p * 1.0000001) { return steps[i] * p; }
  }
  return 10 * p;
}

function cleanSamples(raw) {
  var out = [];
  (Array.isArray(raw) ? raw : []).forEach(function (s) {
    if (!isObj(s) || !isNum(s.t)) { return; }
    if (out.length && s.t < out[out.length - 1].t) { out = []; }  // the clock restarted
    out.push(s);
  });
  return out;
}

function formatSeries(key, v) {
  if (!isNum(v)) { return "-"; }
  if (key === "skip_rate") { return (v * 100).toFixed(1) + "%"; }
  if (key === "latency_ms") { return Math.round(v) + " ms"; }
  return v.toFixed(1);
}

function drawPlot() {
  var dpr = window.devicePixelRatio || 1;
  var w = canvas.clientWidth;
  var h = canvas.clientHeight;
  if (w <= 0 || h <= 0) { return; }
  var pw = Math.round(w * dpr);
  var ph = Math.round(h * dpr);
  if (canvas.width !== pw || canvas.height !== ph) { canvas.width = pw; canvas.height = ph; }
  var ctx = canvas.getContext("2d");
  if (!ctx) { return; }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
  ctx.textBaseline = "alphabetic";

  var left = 6;
  var right = w - 6;
  var top = 8;
  var bottom = h - 18;
  var seconds = isNum(history.seconds) && history.seconds > 0 ? history.seconds : 600;
  var samples = cleanSamples(history.samples);
  var tEnd = samples.length ? samples[samples.length - 1].t : 0;
  function x(t) { return right - (right - left) * (tEnd - t) / seconds; }

  // grid: quarters of each scale, and minutes ago
  ctx.lineWidth = 1;
  ctx.strokeStyle = "#222228";
  ctx.beginPath();
  for (var q = 0; q <= 4; q += 1) {
    var gy = Math.round(top + (bottom - top) * q / 4) + 0.5;
    ctx.moveTo(left, gy);
    ctx.lineTo(right, gy);
  }
  var minutes = seconds / 60;
  var perMinute = (right - left) / minutes;
  var stepChoices = [1, 2, 5, 10, 15, 30, 60, 120];
  var stepMin = stepChoices[stepChoices.length - 1];
  for (var c = 0; c < stepChoices.length; c += 1) {
    if (stepChoices[c] * perMinute >= 84) { stepMin = stepChoices[c]; break; }
  }
  var ticks = [];
  for (var m = 0; m <= minutes + 1e-9; m += stepMin) {
    var gx = Math.round(right - m * perMinute) + 0.5;
    ctx.moveTo(gx, top);
    ctx.lineTo(gx, bottom);
    ticks.push([m, gx]);
  }
  ctx.stroke();
  ctx.fillStyle = "#66666f";
  ctx.textAlign = "left";
  var free = Infinity;  // labels go right to left; one that would overlap the previous is left out
  ticks.forEach(function (tick) {
    var label = tick[0] === 0 ? "now" : tick[0] + " min ago";
    var width = ctx.measureText(label).width;
    var start = Math.min(Math.max(tick[1] - width / 2, left), right - width);
    if (start + width > free - 8) { return; }
    ctx.fillText(label, start, h - 4);
    free = start;
  });

  legend.textContent = "";
  if (samples.length < 2) {
    ctx.textAlign = "center";
    ctx.fillText(samples.length ? "collecting\u2026" : "no history yet",
      (left + right) / 2, (top + bottom) / 2);
  }
  var last = samples.length ? samples[samples.length - 1] : {};
  SERIES.forEach(function (series) {
    var peak = 0;
    samples.forEach(function (s) {
      if (isNum(s[series.key]) && s[series.key] > peak) { peak = s[series.key]; }
    });
    var scale = niceCeil(peak, series.floor);
    if (series.key === "skip_rate") { scale = Math.min(scale, 1); }
    ctx.strokeStyle = series.color;
    ctx.lineWidth = 1.5;
    ctx.lineJoin = "round";
    ctx.beginPath();
    var prevT = null;
    samples.forEach(function (s) {
      var v = s[series.key];
      if (!isNum(v) || tEnd - s.t > seconds) { prevT = null; return; }
      var px = x(s.t);
      var py = bottom - (bottom - top) * Math.min(Math.max(v / scale, 0), 1);
      if (prevT === null || s.t - prevT > 5) { ctx.moveTo(px, py); } else { ctx.lineTo(px, py); }
      prevT = s.t;
    });
    ctx.stroke();

    var item = el("span");
    var swatch = el("i");
    swatch.style.background = series.color;
    item.appendChild(swatch);
    item.appendChild(el("b", null, series.label + " "));
    item.appendChild(document.createTextNode(formatSeries(series.key, last[series.key]) + " "));
    item.appendChild(el("small", null, "(top " + formatSeries(series.key, scale) + ")"));
    legend.appendChild(item);
  });
}

// The plot's samples as pushed: all of them first, then the new ones.
function showHistory(body) {
  var samples = Array.isArray(body.samples) ? body.samples : [];
  var seconds = isNum(body.seconds) && body.seconds > 0 ? body.seconds : history.seconds;
  if (body.append) {
    samples = cleanSamples(history.samples.concat(samples));
    var end = samples.length ? samples[samples.length - 1].t : 0;
    samples = samples.filter(function (s) { return end - s.t <= seconds; });
  }
  history = { seconds: seconds, samples: samples };
  drawPlot();
}

if (typeof ResizeObserver === "function") {
  new ResizeObserver(function () { try { drawPlot(); } catch { /* next poll redraws */ } })
    .observe(canvas);
}
window.addEventListener("resize", function () { try { drawPlot(); } catch { /* ignore */ } });

// ------------------------------------------------------------------ start
// ------------------------------------------------------------------ pushes
// The engine pushes its state on connect and on every change, the status a few times a
// second and new plot samples as they come; the socket reconnects after the engine restarted.
function connectSocket() {
  var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
  var socket = new WebSocket(scheme + window.location.host + API.socket);
  socket.addEventListener("message", function (event) {
    var at = performance.now();
    var body;
    try { body = JSON.parse(event.data); } catch { return; }
    if (!isObj(body)) { return; }
    if (body.type === "state") { showState(body, at); }
    else if (body.type === "history") { showHistory(body); }
    else if (body.type === "offline") {
      showOffline({ status: 503, message: typeof body.error === "string" ? body.error : "not running" });
    }
  });
  socket.addEventListener("close", function () {
    showOffline(null);
    setTimeout(connectSocket, SOCKET_RETRY_MS);
  });
}

drawPlot();
loadSpec();
connectSocket();
