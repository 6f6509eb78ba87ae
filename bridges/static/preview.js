// The plain preview page: the output as MJPEG and a line of stats, polled from the page's source.
const img = document.getElementById("out");
const wait = document.getElementById("wait");
const line = document.getElementById("stats");
const source = line.dataset.source;

img.addEventListener("dblclick", () => {
  if (document.fullscreenElement) {
    document.exitFullscreen();
  } else if (img.requestFullscreen) {
    img.requestFullscreen();
  }
});
img.addEventListener("error", () => {
  // The engine restarted or the stream ended: reconnect shortly.
  setTimeout(() => { img.src = "/stream.mjpg?t=" + Date.now(); }, 1000);
});

function fmt(v) {
  if (typeof v === "number") {
    if (Number.isInteger(v)) { return String(v); }
    return Math.abs(v) < 10 ? v.toFixed(2) : v.toFixed(1);
  }
  if (v === null) { return "-"; }
  if (typeof v === "object") { return JSON.stringify(v); }
  return String(v);
}

function render(stats) {
  line.textContent = "";
  Object.keys(stats).forEach((key) => {
    const item = document.createElement("span");
    const name = document.createElement("b");
    name.textContent = key + ": ";
    item.appendChild(name);
    item.appendChild(document.createTextNode(fmt(stats[key])));
    line.appendChild(item);
  });
  wait.classList.toggle("hidden", stats.frames_sent > 0);
}

function unreachable() {
  line.textContent = "";
  const item = document.createElement("span");
  item.className = "bad";
  item.textContent = "engine not reachable";
  line.appendChild(item);
}

function poll() {
  fetch(source, { cache: "no-store" })
    .then((r) => r.json())
    .then(render)
    .catch(unreachable)
    .finally(() => { setTimeout(poll, 250); });
}
poll();
