// The reference campaign page: plain JavaScript against the DearMP intake API, no build step.
"use strict";

const slug = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const $ = (id) => document.getElementById(id);
let campaign = null;
let idempotencyKey = crypto.randomUUID();

// Where a field path's message is shown, and which input it belongs to.
const FIELDS = {
  "name": ["name-error", "name"],
  "supporter.name": ["name-error", "name"],
  "supporter.email": ["email-error", "email"],
  "postcode": ["postcode-error", "postcode"],
  "supporter.postcode": ["postcode-error", "postcode"],
  "address_lines": ["address-error", "address1"],
  "supporter.address_lines": ["address-error", "address1"],
  "supporter.address_lines.0": ["address-error", "address1"],
  "supporter.address_lines.1": ["address-error", "address2"],
  "member": ["member-error", null],
  "letter.subject": ["subject-error", "subject"],
  "letter.body": ["body-error", "body"],
};
// The campaign's questions add their own: "letter.answers.<key>" (see addPrompts).
const STEP1 = new Set(["name-error", "email-error", "postcode-error", "address-error", "member-error"]);

function clearErrors() {
  document.querySelectorAll(".error").forEach((el) => { el.hidden = true; el.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function showErrors(errors) {
  let first = null;
  let step1 = false;
  for (const [path, message] of Object.entries(errors)) {
    const [errorId, inputId] = FIELDS[path] || ["page-error", null];
    const el = $(errorId);
    el.textContent = el.textContent ? el.textContent + " " + message : message;
    el.hidden = false;
    if (STEP1.has(errorId)) step1 = true;
    if (inputId) {
      $(inputId).setAttribute("aria-invalid", "true");
      first = first || $(inputId);
    }
  }
  if (step1 && !$("letter").hidden) { $("letter").hidden = true; $("details").hidden = false; }
  (first || $("page-error")).focus();
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  return { ok: response.ok, status: response.status, data };
}

function addressLines() {
  return [$("address1").value, $("address2").value].map((s) => s.trim()).filter(Boolean);
}

async function load() {
  const { ok, data } = await call("GET", `/v1/campaigns/${encodeURIComponent(slug)}`);
  if (!ok) { showErrors(data.errors || { page: "This campaign could not be loaded." }); return; }
  campaign = data;
  document.title = `${data.title} — ${data.organisation}`;
  $("title").textContent = data.title;
  $("organisation").textContent = data.organisation;
  $("masthead").hidden = false;
  $("introduction").textContent = data.introduction;
  if (data.example_postcode) {
    $("postcode-hint").textContent = `We use it to find your MP, for example ${data.example_postcode}.`;
  }
  $("mp-notice").textContent = data.mp_notice;
  $("privacy").href = data.privacy_notice_url;
  const box = $("consent-questions");
  for (const q of data.consent_questions) {
    const wrap = document.createElement("div");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.id = `consent-${q.channel}`;
    input.dataset.channel = q.channel;
    const label = document.createElement("label");
    label.htmlFor = input.id;
    label.textContent = q.wording;
    label.style.display = "inline";
    wrap.append(input, " ", label);
    box.append(wrap);
  }
  addPrompts(data.prompts || []);
}

// A labelled box for each of the campaign's questions, under the letter; its answer goes into
// the letter (posted as letter.answers.<key>) and counts as the supporter's own words.
function addPrompts(prompts) {
  const box = $("prompts");
  for (const p of prompts) {
    const id = `answer-${p.key}`;
    const wrap = document.createElement("div");
    wrap.className = "field";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = `${p.question} (${p.required ? "required" : "optional"})`;
    const hint = document.createElement("p");
    hint.id = `${id}-hint`;
    hint.className = "hint";
    hint.textContent = p.min_chars > 1
      ? `In your own words, ${p.min_chars} to ${p.max_chars} characters.`
      : `In your own words, up to ${p.max_chars} characters.`;
    const input = document.createElement("textarea");
    input.id = id;
    input.rows = 4;
    input.maxLength = p.max_chars;
    input.required = p.required;
    input.dataset.key = p.key;
    input.setAttribute("aria-describedby", `${id}-hint ${id}-error`);
    input.addEventListener("input", scoreLater);
    const error = document.createElement("p");
    error.id = `${id}-error`;
    error.className = "error";
    error.hidden = true;
    wrap.append(label, hint, input, error);
    box.append(wrap);
    FIELDS[`letter.answers.${p.key}`] = [error.id, id];
  }
}

function answers() {
  const out = {};
  document.querySelectorAll("#prompts textarea").forEach((el) => { out[el.dataset.key] = el.value; });
  return out;
}

async function toLetter(event) {
  event.preventDefault();
  clearErrors();
  const errors = {};
  if (!$("name").value.trim()) errors["name"] = "Please enter your full name.";
  if (!$("email").value.includes("@")) errors["supporter.email"] = "Please enter your email address.";
  if (!addressLines().length) errors["address_lines"] = "Please enter the first line of your address.";
  if (Object.keys(errors).length) { showErrors(errors); return; }
  const { ok, data } = await call(
    "POST", `/v1/campaigns/${encodeURIComponent(slug)}/preview`, previewBody(undefined, answers()));
  if (!ok) { showErrors(data.errors || { page: "Something went wrong. Please try again." }); return; }
  $("postcode").value = data.postcode;
  $("mp-name").textContent = data.mp.name;
  $("mp-line").textContent = `${data.mp.name} is the MP for ${data.mp.constituency}.`;
  $("subject").value = data.letter.subject;
  $("salutation").textContent = data.letter.salutation;
  $("body").value = data.letter.body;
  $("subject").readOnly = !campaign.editable.includes("subject");
  $("body").readOnly = !campaign.editable.includes("body");
  $("details").hidden = true;
  $("letter").hidden = false;
  $("body").focus();
  showOwnWords(data.own_words);
}

function previewBody(body, answers) {
  return {
    name: $("name").value, postcode: $("postcode").value, address_lines: addressLines(), body, answers,
  };
}

// How much of the letter is in the supporter's own words, as they edit it (the server scores
// it: one request a second at most, after typing stops). It informs; it never blocks sending.
function showOwnWords(share) {
  const percent = Math.round(share * 100);
  $("own-words").textContent =
    `About ${percent} % in your own words: letters in your own words carry more weight with your MP.`;
  $("own-words").hidden = false;
}

let ownWordsTimer = null;
function scoreLater() {
  clearTimeout(ownWordsTimer);
  ownWordsTimer = setTimeout(async () => {
    const { ok, data } = await call(
      "POST", `/v1/campaigns/${encodeURIComponent(slug)}/preview`, previewBody($("body").value, answers()));
    if (ok) showOwnWords(data.own_words);
  }, 1000);
}

async function send(event) {
  event.preventDefault();
  clearErrors();
  $("send").disabled = true;
  const choice = (channel) => ($(`consent-${channel}`) && $(`consent-${channel}`).checked ? "granted" : "refused");
  const { ok, data } = await call("POST", "/v1/submissions", {
    schema_version: 1,
    campaign: slug,
    idempotency_key: idempotencyKey,
    supporter: {
      name: $("name").value, email: $("email").value, postcode: $("postcode").value,
      address_lines: addressLines(),
    },
    letter: { subject: $("subject").value, body: $("body").value, answers: answers() },
    contact_preferences: {
      email: choice("email"), phone: choice("phone"), sms: choice("sms"), post: choice("post"),
      wording_version: campaign.consent_version,
    },
    source_url: location.href,
    website: $("website").value,
  });
  $("send").disabled = false;
  if (!ok) {
    idempotencyKey = crypto.randomUUID();
    showErrors(data.errors || { page: "Something went wrong. Please try again." });
    return;
  }
  $("letter").hidden = true;
  $("thanks").hidden = false;
  $("reference").textContent = data.id;
  $("thanks").focus();
  poll(data.status_url);
}

async function poll(url) {
  for (let i = 0; i < 120; i++) {
    const { ok, data } = await call("GET", url);
    if (ok) {
      $("status").textContent = `${data.state}: ${data.outcome}`;
      if (data.final) return;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("details").hidden = false; // hidden in the HTML: without this script it cannot be used
  $("details").addEventListener("submit", toLetter);
  $("letter").addEventListener("submit", send);
  $("body").addEventListener("input", scoreLater);
  $("back").addEventListener("click", () => { $("letter").hidden = true; $("details").hidden = false; });
  load();
});
