// The /ui page: one image in, POST /inspect, the pictures and both top-k lists out.
// Plain JavaScript, no dependency, no build step. Every URL is relative to the page.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const TOP_K = 5;
  const state = { info: null, image: null, name: "", seq: 0, version: null, samplesSet: false };

  function newSeed() {
    const a = new Uint32Array(1);
    crypto.getRandomValues(a);
    return a[0] % 2 ** 31;
  }

  function status(text) {
    $("status").textContent = text;
  }

  function showError(code, message) {
    const box = $("error");
    box.textContent = code ? `${message} (${code})` : message;
    box.hidden = false;
  }

  // --- the version card ------------------------------------------------------------------
  function showCard(card) {
    const purifier = card.purifier === false ? "; no purifier" : card.purifier ? "; then the purifier g" : "";
    $("card-model").textContent = `Model ${card.name}, version ${card.version}`;
    $("card-transform").textContent = `Random transform t: ${card.transform}${purifier}.`;
    $("card-robustness").textContent = `Recorded evaluation: ${card.robustness}`;
    const notes = $("card-notes");
    notes.replaceChildren(
      ...card.notes.map((text) => {
        const li = document.createElement("li");
        li.textContent = text;
        return li;
      }),
    );
    const samples = $("samples");
    samples.disabled = !card.random;
    if (!card.random) {
      samples.value = "1";
      $("samples-help").textContent = "This version draws nothing: one draw is the whole answer.";
    } else {
      $("samples-help").textContent = "Draws of the random transform averaged into the answer.";
      if (!state.samplesSet) samples.value = String(card.default_samples);
    }
    state.samplesSet = true;
    state.version = card.version;
  }

  async function loadInfo() {
    try {
      const r = await fetch("ui/info", { cache: "no-store" });
      if (!r.ok) throw new Error(`ui/info answered HTTP ${r.status}`);
      const info = await r.json();
      state.info = info;
      $("samples").max = String(info.max_samples);
      $("key-field").hidden = !info.api_key_required;
      showExamples(info.examples);
      if (info.card) {
        showCard(info.card);
      } else {
        $("card-model").textContent = "No model version is loaded yet; retrying…";
        setTimeout(loadInfo, 2000);
      }
    } catch (e) {
      $("card-model").textContent = `The service does not answer (${e.message}); retrying…`;
      setTimeout(loadInfo, 3000);
    }
  }

  function showExamples(names) {
    const box = $("examples");
    if (box.childElementCount) return;
    for (const name of names) {
      const label = name.replace(/\.png$/, "");
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.example = name;
      b.setAttribute("aria-label", `Example image: ${label}`);
      const img = document.createElement("img");
      img.src = `ui/static/samples/${encodeURIComponent(name)}`;
      img.alt = "";
      const span = document.createElement("span");
      span.textContent = label;
      b.append(img, span);
      b.addEventListener("click", async () => {
        const r = await fetch(img.src);
        setImage(await r.blob(), name);
      });
      box.append(b);
    }
  }

  // --- sending ---------------------------------------------------------------------------
  function setImage(blob, name) {
    state.image = blob;
    state.name = name || "image";
    run(false);
  }

  function setBusy(busy) {
    for (const id of ["run", "redraw"]) $(id).disabled = busy;
    $("result").setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function run(fresh) {
    $("error").hidden = true;
    if (!state.image) {
      status("Choose an image first.");
      return;
    }
    const info = state.info || { max_samples: 16, max_top_k: TOP_K, max_body_bytes: Infinity };
    if (state.image.size > info.max_body_bytes) {
      showError("body_too_large", `The image is ${state.image.size} bytes; this server takes at most ${info.max_body_bytes}.`);
      return;
    }
    let seed = $("seed").value.trim();
    if (fresh || seed === "") {
      seed = String(newSeed());
      $("seed").value = seed;
    }
    const samplesField = $("samples");
    const samples = samplesField.disabled ? 1 : Math.max(1, Math.min(info.max_samples, parseInt(samplesField.value, 10) || 1));
    samplesField.value = String(samples);
    const body = new FormData();
    body.append("image", state.image, state.name);
    body.append("seed", seed);
    body.append("samples", String(samples));
    body.append("top_k", String(Math.min(TOP_K, info.max_top_k)));
    const headers = {};
    const key = $("api-key").value;
    if (key) headers["X-API-Key"] = key;
    const seq = ++state.seq;
    setBusy(true);
    $("result").dataset.state = "busy";
    status(`Asking the model about ${state.name}…`);
    const t0 = performance.now();
    let r;
    let data;
    try {
      r = await fetch("inspect", { method: "POST", body, headers });
      data = await r.json();
    } catch (e) {
      if (seq === state.seq) {
        setBusy(false);
        $("result").dataset.state = "error";
        status("No answer.");
        showError("network", `The service did not answer: ${e.message}`);
      }
      return;
    }
    if (seq !== state.seq) return; // a newer request is on its way; its answer wins
    setBusy(false);
    if (!r.ok) {
      $("result").dataset.state = "error";
      status("The service refused the request.");
      const err = (data && data.error) || {};
      showError(err.code || `http_${r.status}`, err.message || `HTTP ${r.status}`);
      return;
    }
    render(data, performance.now() - t0);
  }

  // --- rendering -------------------------------------------------------------------------
  function png(b64) {
    return `data:image/png;base64,${b64}`;
  }

  function picture(img, b64, alt, copies) {
    img.src = png(b64);
    img.alt = alt;
    img.classList.toggle("wide", copies > 1);
    img.style.setProperty("--copies", String(copies));
    img.hidden = false;
  }

  function missing(imgId, noneId, text) {
    $(imgId).hidden = true;
    $(imgId).removeAttribute("src");
    const p = $(noneId);
    p.textContent = text;
    p.hidden = false;
  }

  function bars(list, scores) {
    list.replaceChildren(
      ...scores.map((s) => {
        const li = document.createElement("li");
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = s.label;
        const track = document.createElement("span");
        track.className = "track";
        track.setAttribute("aria-hidden", "true");
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.display = "block";
        fill.style.width = `${(100 * s.probability).toFixed(1)}%`;
        track.append(fill);
        const value = document.createElement("span");
        value.className = "value";
        value.textContent = `${(100 * s.probability).toFixed(1)}%`;
        li.append(name, track, value);
        return li;
      }),
    );
  }

  function render(data, roundTripMs) {
    const res = data.results[0];
    const card = data.card;
    const before = state.version;
    showCard(card);
    const views = res.views;
    const size = imageWidth(views.input);
    const copies = views.transformed ? Math.round(imageWidth(views.transformed[0]) / size) || 1 : 1;
    picture($("img-input"), views.input, `The image as the model sees it: ${size} by ${size} pixels.`, 1);
    if (views.transformed) {
      $("none-transformed").hidden = true;
      const alt = copies > 1 ? `t(x), draw 1: ${copies} masked copies side by side, missing pixels in magenta.` : "t(x), draw 1: noisy image, missing pixels in magenta.";
      picture($("img-transformed"), views.transformed[0], alt, copies);
    } else {
      missing("img-transformed", "none-transformed", card.random ? "Not shown: this version's graph does not return t(x) (it was exported before that output existed)." : "t(x) = x here: this version has no random transform (no noise, no masks). Its graph does not return the picture.");
    }
    if (views.purified) {
      $("none-purified").hidden = true;
      picture($("img-purified"), views.purified[0], "g(t(x)), draw 1: the purified image the classifier sees.", 1);
    } else {
      missing("img-purified", "none-purified", card.purifier === false ? "g(t(x)) = x here: this version has no purifier. Its graph does not return the picture." : "Not shown: this version's graph does not return g(t(x)) (it was exported before that output existed).");
    }
    const strip = $("strip");
    strip.replaceChildren();
    if (views.transformed && views.transformed.length > 1) {
      views.transformed.forEach((t, j) => {
        const li = document.createElement("li");
        const tImg = document.createElement("img");
        const gImg = document.createElement("img");
        tImg.className = gImg.className = "px";
        picture(tImg, t, `t(x), draw ${j + 1}`, copies);
        picture(gImg, views.purified[j], `g(t(x)), draw ${j + 1}`, 1);
        const n = document.createElement("span");
        n.textContent = String(j + 1);
        li.append(n, tImg, gImg);
        strip.append(li);
      });
    }
    $("strip-box").hidden = strip.childElementCount === 0;
    $("label").textContent = res.label;
    bars($("topk-defended"), res.top_k);
    if (res.undefended_top_k) {
      $("label-undefended").textContent = res.undefended_top_k[0].label;
      bars($("topk-undefended"), res.undefended_top_k);
    } else {
      $("label-undefended").textContent = "not available";
      $("topk-undefended").replaceChildren();
    }
    const s = res.suspicion;
    const sus = $("suspicion");
    sus.classList.toggle("flagged", Boolean(s && s.suspicious));
    if (!s) {
      sus.textContent = "Attack suspicion: not available (no undefended output).";
    } else if (s.suspicious) {
      sus.textContent = `Attack suspicion: yes. The undefended classifier says ${s.undefended_label}, the defense says ${res.label} (difference ${s.score.toFixed(3)}, from 0 to 1).`;
    } else {
      sus.textContent = `Attack suspicion: no. Both say ${res.label} (difference ${s.score.toFixed(3)}, from 0 to 1).`;
    }
    const t = data.timing;
    const swapped = before !== null && before !== data.model.version ? ` (the service switched from v${before})` : "";
    $("served").textContent =
      `Answered by ${data.model.name} v${data.model.version}${swapped} · ${t.total_ms.toFixed(1)} ms in the service ` +
      `(queue ${t.queue_ms.toFixed(1)}, model ${t.inference_ms.toFixed(1)}) · ${roundTripMs.toFixed(0)} ms round trip · ` +
      `seed ${data.seed} · ${data.samples} draw${data.samples === 1 ? "" : "s"}`;
    $("served").dataset.version = String(data.model.version);
    $("result").dataset.state = "done";
    $("result").dataset.answers = String(Number($("result").dataset.answers || 0) + 1);
    status(`Done: ${state.name} is a ${res.label} to the defended model.`);
  }

  function imageWidth(b64) {
    // PNG: the width is the big-endian uint32 at byte 16 (IHDR); no decoding needed
    const bytes = atob(b64.slice(0, 32));
    return ((bytes.charCodeAt(16) << 24) | (bytes.charCodeAt(17) << 16) | (bytes.charCodeAt(18) << 8) | bytes.charCodeAt(19)) >>> 0;
  }

  // --- input -------------------------------------------------------------------------------
  function wire() {
    $("file").addEventListener("change", (e) => {
      const f = e.target.files[0];
      if (f) setImage(f, f.name);
      e.target.value = "";
    });
    const drop = $("drop");
    document.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    document.addEventListener("dragleave", (e) => {
      if (e.target === document.documentElement || e.target === drop) drop.classList.remove("over");
    });
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const f = e.dataTransfer && e.dataTransfer.files[0];
      if (f) setImage(f, f.name);
    });
    document.addEventListener("paste", (e) => {
      const items = Array.from((e.clipboardData && e.clipboardData.items) || []);
      const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
      if (!item) return; // text pasted into a field stays text
      e.preventDefault();
      setImage(item.getAsFile(), "pasted image");
    });
    $("controls").addEventListener("submit", (e) => {
      e.preventDefault();
      run(false);
    });
    $("redraw").addEventListener("click", () => run(true));
    $("samples").addEventListener("change", () => {
      state.samplesSet = true;
    });
  }

  wire();
  loadInfo();
})();
