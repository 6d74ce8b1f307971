// The review app's keys. No inline script is allowed (Content-Security-Policy), so every handler is here.
// Pairs table: j/k move, Enter opens, / searches. One pair: a accept, r reject, u undo, f flag with a note,
// e edit, n/p next/previous, Esc back to the table (or out of the box being typed in).
"use strict";

function typing(target) {
  return target.closest("input, textarea, select, [contenteditable]") !== null;
}

function rows() {
  return Array.from(document.querySelectorAll("#table tbody tr.row"));
}

function select(index) {
  const all = rows();
  if (all.length === 0) return;
  index = Math.max(0, Math.min(all.length - 1, index));
  all.forEach((row, i) => row.classList.toggle("selected", i === index));
  all[index].scrollIntoView({block: "nearest"});
}

function selected() {
  return rows().findIndex((row) => row.classList.contains("selected"));
}

function click(id) {
  const element = document.getElementById(id);
  if (element) element.click();
  return element !== null;
}

function follow(id) {
  const link = document.getElementById(id);
  if (link) window.location.href = link.href;
  return link !== null;
}

function toggleEdit(show) {
  const form = document.getElementById("edit");
  const texts = document.getElementById("texts");
  if (!form) return;
  const open = show === undefined ? form.hidden : show;
  form.hidden = !open;
  if (texts) texts.hidden = open;
  if (open) form.querySelector("textarea").focus();
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "Escape") {
    if (typing(event.target)) { event.target.blur(); return; }
    const form = document.getElementById("edit");
    if (form && !form.hidden) { toggleEdit(false); return; }
    follow("back");
    return;
  }
  if (typing(event.target)) return;
  const onTable = document.getElementById("table") !== null;
  const handled = (() => {
    switch (event.key) {
      case "/": { const box = document.getElementById("search"); if (box) box.focus(); return box !== null; }
      case "j": if (!onTable) return false; select(selected() + 1); return true;
      case "k": if (!onTable) return false; select(selected() - 1); return true;
      case "Enter": {
        const row = rows()[selected()];
        if (!row) return false;
        window.location.href = row.dataset.href;
        return true;
      }
      case "a": return click("accept");
      case "r": return click("reject");
      case "u": return click("undo");
      case "f": { const note = document.getElementById("note"); if (note) note.focus(); return note !== null; }
      case "e": if (!document.getElementById("edit")) return false; toggleEdit(); return true;
      case "n": return follow("next");
      case "p": return follow("previous");
      default: return false;
    }
  })();
  if (handled) event.preventDefault();
});

document.addEventListener("click", (event) => {
  if (event.target.closest("#edit-button")) { toggleEdit(); return; }
  if (event.target.closest("#cancel-edit")) { toggleEdit(false); return; }
  const row = event.target.closest("#table tbody tr.row");
  if (row && !event.target.closest("a")) window.location.href = row.dataset.href;
});

function say(text) {
  const message = document.getElementById("message");
  if (message) message.textContent = text;
}

document.addEventListener("htmx:responseError", (event) => {
  const status = event.detail.xhr.status;
  if (status !== 400) say(status === 403 ? "Refused: open the address magpie-local review printed." : `The server answered ${status}.`);
});
document.addEventListener("htmx:sendError", () => say("The review server does not answer: is magpie-local review still running?"));

document.addEventListener("htmx:afterSwap", (event) => {
  if (event.detail.target.id !== "message") say("");
  if (event.detail.target.id === "pairs") select(0);
  if (event.detail.target.id === "review") {
    // htmx keeps the focus in the new note box (same id): give the keys back to the page.
    const note = document.getElementById("note");
    if (note) { note.value = ""; note.blur(); }
  }
});

document.addEventListener("htmx:afterRequest", (event) => {
  if (event.detail.elt.id === "edit" && event.detail.successful) toggleEdit(false);  // show the saved text
});

document.addEventListener("DOMContentLoaded", () => { if (rows().length) select(0); });
