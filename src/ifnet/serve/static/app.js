// ifnet serve: the upload page. Plain JavaScript, no dependencies. Every piece of text from the
// server or from a file name goes through textContent, never innerHTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const files = { frontal: null, lateral: null };
  let maxUploadBytes = null;

  const STAGES = [
    ["upload", "Upload"], ["queue_wait", "Queue"], ["image_decode", "Decode images"], ["enhance", "Enhancement (IEC)"],
    ["preprocess", "Preprocess"], ["backbone", "Visual backbone"], ["memory_encoder", "Memory + encoder"],
    ["decode", "Report decoding"], ["consistency", "Report vs findings check"], ["heatmap", "Heatmap"], ["render_images", "Render images"],
  ];

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) node.append(child);
    return node;
  }

  function formatBytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(0) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  // The results on screen belong to the images they were made from: a new image or a new request takes them
  // away, so a report is never read beside another study's image or under an error about a new one.
  function clearResults() {
    $("output").hidden = true;
    $("placeholder").hidden = false;
  }

  function setFile(field, file) {
    clearResults();
    files[field] = file || null;
    const drop = $("drop-" + field);
    $(field + "-name").textContent = file ? file.name + " · " + formatBytes(file.size) : "";
    drop.classList.toggle("has-file", Boolean(file));
    drop.querySelector(".clear").hidden = !file;
    if (!file) $(field + "-input").value = "";
    $("generate").disabled = !files.frontal;
    showError("");
  }

  function wireDrop(field) {
    const drop = $("drop-" + field);
    const input = $(field + "-input");
    input.addEventListener("change", () => setFile(field, input.files[0]));
    drop.querySelector(".clear").addEventListener("click", () => setFile(field, null));
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("dragging"); });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, () => drop.classList.remove("dragging"));
    }
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      const dropped = Array.from(event.dataTransfer.files);
      if (!dropped.length) return;
      setFile(field, dropped[0]);
      // Two files dropped on the frontal box: the second is the lateral view.
      if (field === "frontal" && dropped.length > 1) setFile("lateral", dropped[1]);
    });
  }

  async function loadModelInfo() {
    try {
      const response = await fetch("/v1/model");
      const info = await response.json();
      if (!response.ok) throw new Error(info.error || response.statusText);
      maxUploadBytes = info.limits.max_upload_bytes;
      const box = $("model-info");
      box.textContent = "Model";
      for (const text of [info.checkpoint, info.runtime, info.extractor, "IEC " + info.iec, "beam " + info.beam_size, info.device]) {
        box.append(el("span", { className: "chip", textContent: text }));
      }
      const list = $("observations");
      for (const name of info.observations) list.append(el("option", { value: name }));
    } catch (err) {
      $("model-info").textContent = "Model information unavailable: " + err.message;
    }
  }

  function figure(src, caption, detail, alt) {
    const cap = el("figcaption", {}, [el("strong", { textContent: caption })]);
    if (detail) cap.append(" · " + detail);
    return el("figure", {}, [el("img", { src: src, alt: alt }), cap]);
  }

  function renderImages(result) {
    const rows = $("image-rows");
    rows.replaceChildren();
    const iec = result.model.iec;
    $("iec-note").textContent = iec === "none" ? "this checkpoint uses no enhancement" : "enhancement: " + iec.toUpperCase();
    const images = result.images || {};
    for (const view of result.views) {
      const pair = images[view.field];
      if (!pair) continue;
      const size = view.width + " × " + view.height + " " + view.format.toUpperCase();
      const grid = el("div", { className: "image-grid" }, [
        figure(pair.original, "Original", size, view.field + " view, original"),
        figure(pair.enhanced, "Enhanced", iec, view.field + " view, enhanced"),
      ]);
      grid.lastChild.querySelector("img").classList.add("enhanced-image");
      if (view.field === "frontal" && images.heatmap) {
        grid.append(figure(images.heatmap, "Heatmap", result.heatmap_label, "heatmap of " + result.heatmap_label));
      }
      rows.append(el("div", { className: "image-row" }, [
        el("p", { className: "image-row-title", textContent: view.field + " view" }), grid,
      ]));
    }
  }

  function renderFindings(result) {
    const list = $("findings-list");
    list.replaceChildren();
    const entries = Object.entries(result.findings).sort((a, b) => b[1] - a[1]);
    for (const [name, p] of entries) {
      const bar = el("span");
      bar.style.width = (Math.max(0, Math.min(1, p)) * 100).toFixed(1) + "%";
      const row = el("li", { className: "finding" + (p >= 0.5 ? " positive" : "") }, [
        el("span", { className: "finding-name", textContent: name, title: name }),
        el("span", { className: "finding-value", textContent: (p * 100).toFixed(0) + "%" }),
        el("div", { className: "finding-bar" }, [bar]),
      ]);
      row.dataset.name = name;
      row.dataset.probability = String(p);
      list.append(row);
    }
  }

  function renderTimings(timings) {
    const box = $("timings");
    box.replaceChildren();
    const row = (label, ms, extra) => el("div", { className: "timing" + (extra || "") }, [
      el("span", { textContent: label }), el("span", { textContent: ms.toFixed(ms < 10 ? 1 : 0) + " ms" })]);
    for (const [key, label] of STAGES) {
      if (timings[key] !== undefined) box.append(row(label, timings[key]));
    }
    if (timings.request !== undefined) box.append(row("Total in the server", timings.request, " total"));
  }

  function render(result) {
    $("report-text").textContent = result.report || "(empty report)";
    if (result.conditioned_on === "supplied") {
      const supplied = Object.keys(result.condition).filter((k) => result.condition[k] > 0.5);
      $("conditioned").textContent = "conditioned on supplied findings: " + supplied.join(", ");
    } else {
      $("conditioned").textContent = "conditioned on predicted findings";
    }
    const said = result.consistency || {};
    const notes = [];
    if ((said.unsaid || []).length) notes.push("in the condition but not said by the report: " + said.unsaid.join(", "));
    if ((said.unsupported || []).length) notes.push("said by the report but not in the condition: " + said.unsupported.join(", "));
    $("consistency").replaceChildren(...notes.map((n) => el("li", { textContent: n })));
    const warnings = $("warnings");
    warnings.replaceChildren(...result.warnings.map((w) => el("li", { textContent: w })));
    renderImages(result);
    renderFindings(result);
    renderTimings(result.timings_ms);
    $("placeholder").hidden = true;
    $("output").hidden = false;
  }

  async function readError(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return body.error;
    } catch (_) { /* not JSON: e.g. a proxy's or uvicorn's plain-text page */ }
    return (response.status + " " + response.statusText + " " + text.slice(0, 200)).trim();
  }

  async function generate(event) {
    event.preventDefault();
    if (!files.frontal) { showError("Add a frontal image first."); return; }
    const total = files.frontal.size + (files.lateral ? files.lateral.size : 0);
    if (maxUploadBytes !== null && total > maxUploadBytes) {
      showError("The images add up to " + formatBytes(total) + ", above this server's limit of " +
        formatBytes(maxUploadBytes) + ".");
      return;
    }
    const form = new FormData();
    form.append("frontal", files.frontal, files.frontal.name);
    if (files.lateral) form.append("lateral", files.lateral, files.lateral.name);
    form.append("findings", $("findings-input").value);
    form.append("heatmap", $("heatmap-input").checked ? "true" : "false");

    const button = $("generate");
    button.disabled = true;
    button.classList.add("busy");
    button.querySelector(".label").textContent = "Generating…";
    showError("");
    clearResults();
    try {
      const response = await fetch("/v1/reports?include_images=true", { method: "POST", body: form });
      if (!response.ok) {
        let message = await readError(response);
        const retry = response.headers.get("Retry-After");
        if (response.status === 503 && retry) message += " (retry in " + retry + " s)";
        showError(message);
        return;
      }
      render(await response.json());
    } catch (err) {
      showError("Could not reach the server: " + err.message);
    } finally {
      button.disabled = !files.frontal;
      button.classList.remove("busy");
      button.querySelector(".label").textContent = "Generate report";
    }
  }

  wireDrop("frontal");
  wireDrop("lateral");
  $("study-form").addEventListener("submit", generate);
  // A file dropped outside the boxes would make the browser navigate away from the page.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
  loadModelInfo();
})();
