// The chat page: a conversation against this server's /v1/chat/completions, streamed over server-sent
// events read with fetch + ReadableStream; stop is an AbortController (the server then stops generating).
// Plain script, no libraries and nothing from the network.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { messages: [], model: null, controller: null };

  // ---- markdown: paragraphs, **bold**, `code`, fenced code blocks; HTML is escaped first ----------------
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function renderInline(escaped) {
    // code spans first, so ** inside `code` stays literal
    return escaped.split(/(`[^`\n]+`)/g).map((part) => {
      if (part.length > 2 && part[0] === "`" && part[part.length - 1] === "`") {
        return "<code>" + part.slice(1, -1) + "</code>";
      }
      return part.replace(/\*\*([^*\n]+?)\*\*/g, "<strong>$1</strong>").replace(/\n/g, "<br>");
    }).join("");
  }

  function renderMarkdown(src) {
    const out = [];
    const lines = src.split("\n");
    let para = [];
    const flush = () => {
      if (para.length) out.push("<p>" + renderInline(escapeHtml(para.join("\n"))) + "</p>");
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const fence = lines[i].match(/^\s*```\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        const code = [];
        for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
        // an unclosed fence (a reply still streaming) runs to the end
        const cls = fence[1] ? ' class="language-' + escapeHtml(fence[1]) + '"' : "";
        out.push("<pre><code" + cls + ">" + escapeHtml(code.join("\n")) + "</code></pre>");
      } else if (lines[i].trim() === "") {
        flush();
      } else {
        para.push(lines[i]);
      }
    }
    flush();
    return out.join("");
  }

  // ---- conversation view ----------------------------------------------------------------------------
  function addMessage(kind, text) {
    const el = document.createElement("div");
    el.className = "msg " + kind;
    if (kind === "assistant") el.innerHTML = renderMarkdown(text);
    else el.textContent = text;
    $("conversation").appendChild(el);
    scrollDown();
    return el;
  }

  function showError(message) {
    const el = addMessage("error", "Error: " + message);
    el.setAttribute("role", "alert");
    return el;
  }

  function addNote(el, text) {
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = text;
    el.appendChild(note);
  }

  function scrollDown() {
    const c = $("conversation");
    c.scrollTop = c.scrollHeight;
  }

  function setBusy(busy, status) {
    $("send").disabled = busy;
    $("stop").hidden = !busy;
    $("status").textContent = status || (busy ? "generating…" : "ready");
  }

  // ---- talking to the server -------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  async function errorMessage(resp) {
    let text = "";
    try {
      text = await resp.text();
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message + " (HTTP " + resp.status + ")";
    } catch (e) { /* not JSON: show the status and the text */ }
    return "HTTP " + resp.status + (text ? ": " + text.slice(0, 200) : "");
  }

  async function* sseEvents(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (resp.status === 401) {
        $("model").textContent = "needs an API key";
        showError("this server needs an API key: enter it under API key, then send again");
        return;
      }
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const body = await resp.json();
      state.model = body.data[0].id;
      $("model").textContent = state.model + " · " + body.data[0].context_length + "-token context";
    } catch (e) {
      $("model").textContent = "not connected";
      showError("cannot reach the server: " + e.message);
    }
  }

  function requestBody() {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.messages);
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (state.model) body.model = state.model;
    const temperature = parseFloat($("temperature").value);
    if (!Number.isNaN(temperature)) body.temperature = temperature;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
    if ($("json-mode").checked) {
      let schema;
      try {
        schema = JSON.parse($("schema").value);
      } catch (e) {
        throw new Error("the JSON schema is not valid JSON: " + e.message);
      }
      body.response_format = { type: "json_schema", json_schema: { name: "reply", schema, strict: true } };
    }
    return body;
  }

  async function send(text) {
    let body;
    const history = state.messages;   // "New chat" replaces the array: a late reply lands in the old one
    history.push({ role: "user", content: text });
    try {
      body = requestBody();
    } catch (e) {
      history.pop();
      showError(e.message);
      return;
    }
    addMessage("user", text);
    const bubble = addMessage("assistant", "");
    bubble.classList.add("streaming");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    let reply = "";
    let finish = null;
    let usage = null;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      for await (const chunk of sseEvents(resp)) {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) {
            reply += c.delta.content;
            bubble.innerHTML = renderMarkdown(reply);
            scrollDown();
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
      history.push({ role: "assistant", content: reply });
      bubble.classList.remove("streaming");
      if (!reply) addNote(bubble, "(empty reply)");
      if (finish === "length") addNote(bubble, "stopped at the token limit");
      if (usage) addNote(bubble, usage.prompt_tokens + " prompt + " + usage.completion_tokens + " reply tokens");
      setBusy(false);
    } catch (e) {
      bubble.classList.remove("streaming");
      if (e.name === "AbortError") {
        // the partial reply stays in the conversation, so the next turn follows what was shown
        history.push({ role: "assistant", content: reply });
        addNote(bubble, "stopped");
        setBusy(false, "stopped");
      } else {
        // the turn failed: take it back out of the history and give the text back to edit
        history.pop();
        bubble.remove();
        showError(e.message);
        if (!$("input").value) $("input").value = text;
        setBusy(false, "error");
      }
    } finally {
      if (state.controller === controller) state.controller = null;
    }
  }

  // ---- wiring ----------------------------------------------------------------------------------------
  function init() {
    $("composer").addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (state.controller) return;
      const text = $("input").value.trim();
      if (!text) return;
      $("input").value = "";
      send(text);
    });
    $("input").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => {
      if (state.controller) state.controller.abort();
    });
    $("new-chat").addEventListener("click", () => {
      if (state.controller) state.controller.abort();
      state.messages = [];
      $("conversation").replaceChildren();
      setBusy(false);
    });
    $("json-mode").addEventListener("change", () => { $("schema").disabled = !$("json-mode").checked; });
    $("api-key").addEventListener("change", () => {
      try { sessionStorage.setItem("gptstack-api-key", $("api-key").value); } catch (e) { /* storage off */ }
      loadModel();
    });
    try { $("api-key").value = sessionStorage.getItem("gptstack-api-key") || ""; } catch (e) { /* storage off */ }
    loadModel();
  }

  window.gptstackChat = { renderMarkdown, state };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
