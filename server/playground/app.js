// The playground: a page that talks to this server's own OpenAI routes, streaming. No build step, no libraries.
"use strict";

const EXAMPLES = [
  { lang: "English → Chinese", text: "Beijing is the capital of China.\nTranslate this sentence from English to Chinese." },
  { lang: "French → English", text: "Translate to English: Je t'aime." },
  { lang: "العربية", text: "ما هي عاصمة مصر؟ أجب بجملة واحدة." },
  { lang: "עברית", text: "ספר לי בקצרה על העיר ירושלים." },
  { lang: "中文", text: "用三句话介绍一下长城。" },
  { lang: "Español", text: "Escribe un poema corto sobre el mar." },
  { lang: "Русский", text: "Объясни простыми словами, что такое фотосинтез." },
  { lang: "日本語", text: "日本の四季について短く説明してください。" },
  { lang: "ไทย", text: "แนะนำอาหารไทยยอดนิยมสามอย่าง" },
  { lang: "Bahasa Indonesia", text: "Apa ibu kota Indonesia?" },
  { lang: "Deutsch", text: "Nenne drei berühmte deutsche Komponisten." },
  { lang: "Tiếng Việt", text: "Hãy giới thiệu ngắn gọn về thành phố Hà Nội." },
];
const KEY_STORE = "polyglot-api-key";
const PLAIN_WORDS = {
  400: "The server did not accept the request",
  401: "The API key was refused",
  404: "Not found",
  413: "The request is too large",
  422: "The server did not accept the request",
  429: "Too many requests",
  503: "The server is busy or shutting down; try again shortly",
  504: "The answer took longer than the server allows",
};

const $ = (id) => document.getElementById(id);
const state = { mode: "chat", history: [], controller: null, model: null, key: sessionStorage.getItem(KEY_STORE) || "" };

class ServerError extends Error {
  constructor(status, message) {
    const words = PLAIN_WORDS[status] || (status >= 500 ? "The server failed" : "The request failed");
    super(`${words} (${status}): ${message}`);
    this.status = status;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function serverError(response) {
  let message = response.statusText || "no details";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  return new ServerError(response.status, message);
}

function showError(error) {
  const box = $("error");
  if (error instanceof TypeError) {  // fetch's way of saying the network failed
    box.textContent = "Could not reach the server. Is it still running?";
  } else {
    box.textContent = error.message || String(error);
  }
  box.hidden = false;
  if (error.status === 401) askForKey("The server refused the API key. Enter a valid one.");
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// -- model and API key -------------------------------------------------------------------------------------------
async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    if (r.status === 401) {
      askForKey(state.key ? "The server refused the API key. Enter a valid one." : undefined);
      return;
    }
    if (!r.ok) throw await serverError(r);
    const body = await r.json();
    state.model = body.data.length ? body.data[0].id : null;
    $("model").textContent = state.model || "none";
    hideError();
  } catch (e) {
    $("model").textContent = "unavailable";
    showError(e);
  }
}

function askForKey(why) {
  $("key-button").hidden = false;
  if (why) $("key-why").textContent = why;
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

function saveKey(event) {
  event.preventDefault();
  state.key = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORE, state.key);
  $("key-dialog").close();
  loadModel();
}

// -- the conversation --------------------------------------------------------------------------------------------
function addMessage(role, text) {
  const el = document.createElement("article");
  el.className = `message ${role}`;
  const who = document.createElement("p");
  who.className = "who";
  who.textContent = { user: "You", assistant: "Assistant", prompt: "Prompt", completion: "Completion" }[role];
  const body = document.createElement("p");
  body.className = "text";
  body.dir = "auto";  // Arabic and Hebrew run right to left, each message on its own
  body.textContent = text;
  el.append(who, body);
  $("conversation").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function copyText(text, button) {
  const done = () => {
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else {
    fallbackCopy(text, done);
  }
}

function fallbackCopy(text, done) {  // pages served over plain http on another host have no clipboard API
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  done();
}

function finishMessage(el, text, stats) {
  el.classList.remove("streaming");
  const meta = document.createElement("div");
  meta.className = "meta";
  const info = document.createElement("span");
  info.className = "stats";
  info.textContent = stats;
  meta.append(info);
  if (text) {
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "secondary copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy this answer");
    copy.addEventListener("click", () => copyText(text, copy));
    meta.append(copy);
  }
  el.append(meta);
}

// -- the request -------------------------------------------------------------------------------------------------
function number(id, parse) {
  const input = $(id);
  if (input.value.trim() === "") return undefined;
  if (!input.checkValidity()) {
    const label = document.querySelector(`label[for="${id}"]`).textContent;
    throw new Error(`${label}: ${input.validationMessage}`);
  }
  return parse(input.value);
}

function parameters() {
  const p = {};
  const beams = number("num_beams", (v) => parseInt(v, 10));
  const values = {
    max_tokens: number("max_tokens", (v) => parseInt(v, 10)),
    seed: number("seed", (v) => parseInt(v, 10)),
    num_beams: beams,
  };
  if (!(beams > 1)) {
    values.temperature = number("temperature", parseFloat);
    values.top_p = number("top_p", parseFloat);
  }
  for (const [k, v] of Object.entries(values)) if (v !== undefined) p[k] = v;
  const stops = $("stop_strings").value.split("\n").filter((s) => s !== "").map((s) => s.replaceAll("\\n", "\n"));
  if (stops.length) p.stop = stops;
  return p;
}

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.disabled = busy;
}

async function send(event) {
  if (event) event.preventDefault();
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.controller) return;
  hideError();
  let params;
  try {
    params = parameters();
  } catch (e) {
    showError(e);
    return;
  }
  const chat = state.mode === "chat";
  let url, body;
  if (chat) {
    const system = $("system").value.trim();
    state.history.push({ role: "user", content: text });
    body = { messages: [...(system ? [{ role: "system", content: system }] : []), ...state.history] };
    url = "v1/chat/completions";
    addMessage("user", text);
    input.value = "";
  } else {
    body = { prompt: text };
    url = "v1/completions";
    addMessage("prompt", text);
  }
  if (state.model) body.model = state.model;
  Object.assign(body, params, { stream: true, stream_options: { include_usage: true } });

  const answer = addMessage(chat ? "assistant" : "completion", "");
  answer.classList.add("streaming");
  const out = answer.querySelector(".text");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let chunks = 0, finish = null, usage = null, reply = "", failure = null;
  try {
    const r = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) throw await serverError(r);
    for await (const ev of events(r)) {
      if (ev.error) throw new ServerError(ev.error.code === "timeout" ? 504 : 500, ev.error.message);
      if (ev.usage) usage = ev.usage;
      for (const c of ev.choices || []) {
        const piece = chat ? c.delta && c.delta.content : c.text;
        if (piece) {
          reply += piece;
          chunks += 1;
          out.textContent = reply;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
      answer.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failure = e;
  } finally {
    state.controller = null;
    setBusy(false);
  }
  const ended = performance.now();
  if (failure && !reply) {  // nothing came back: take the turn back and return the text to the box to send again
    if (chat) state.history.pop();
    answer.previousElementSibling.remove();
    answer.remove();
    input.value = text;
    showError(failure);
    input.focus();
    return;
  }
  if (chat && reply) state.history.push({ role: "assistant", content: reply });
  // from sending to the last token: beam search may hold its text back until the end, so there is no fair "first"
  const tokens = usage ? usage.completion_tokens : chunks;
  const seconds = (ended - started) / 1000;
  const parts = [`${usage ? "" : "about "}${tokens} token${tokens === 1 ? "" : "s"} in ${seconds.toFixed(1)} s`,
    tokens ? `${(tokens / seconds).toFixed(1)} tokens/s` : "", `finish: ${finish || (failure ? "error" : "none")}`];
  finishMessage(answer, reply, parts.filter(Boolean).join(" · "));
  if (failure) showError(failure);
  input.focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function setMode(mode) {
  state.mode = mode;
  const chat = mode === "chat";
  $("input-label").textContent = chat ? "Message" : "Prompt (the model continues it)";
  $("system").disabled = !chat;
  $("clear").textContent = chat ? "New chat" : "Clear";
}

function clearConversation() {
  if (state.controller) return;
  state.history = [];
  $("conversation").replaceChildren();
  hideError();
  $("input").focus();
}

function showExamples() {
  for (const ex of EXAMPLES) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    const lang = document.createElement("span");
    lang.className = "lang";
    lang.textContent = ex.lang;
    const preview = document.createElement("span");
    preview.dir = "auto";
    preview.textContent = ex.text.split("\n")[0].slice(0, 28) + (ex.text.length > 28 ? "…" : "");
    b.append(lang, preview);
    b.setAttribute("aria-label", `Example in ${ex.lang}: ${ex.text}`);
    b.addEventListener("click", () => {
      $("input").value = ex.text;
      $("input").focus();
    });
    li.append(b);
    $("examples").append(li);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  showExamples();
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) stop();
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearConversation);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => setMode(radio.value));
  }
  $("key-form").addEventListener("submit", saveKey);
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  $("key-button").addEventListener("click", () => askForKey());
  if (state.key) $("key-button").hidden = false;
  loadModel();
});
