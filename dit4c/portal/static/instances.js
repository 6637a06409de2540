// Live instance states: the portal pushes each change as a Server-Sent Event,
// and this updates the row in place, so a start can be watched without reloading.
(function () {
  "use strict";
  if (!window.EventSource) { return; }
  // The instance life as the portal states it (dit4c.common.life): states, actions, deadlines.
  var LIFE = JSON.parse(document.getElementById("dit4c-life").textContent);
  var ACTIONS = LIFE.actions;
  var source = new EventSource("/events");
  // One instance's page shows only it: the others' changes are not its business.
  var table = document.getElementById("instances");
  var only = table ? table.dataset.only : undefined;
  function ended(row) { return LIFE.terminal.indexOf(row.querySelector(".state").dataset.state) >= 0; }
  // Once a form is sent, its answer is the next page: a reload now would
  // abort it (the portal finishes the action anyway, but its message is lost).
  var leaving = false;
  document.addEventListener("submit", function (e) { if (!e.defaultPrevented) { leaving = true; } });
  function reload() { if (!leaving) { window.location.reload(); } }
  // "instance": a change as it happens; "snapshot": where an instance stands
  // when the stream (re)starts, so nothing changed meanwhile is missed.
  function show(live) {
    return function (message) {
      var change = JSON.parse(message.data);
      if (only && change.id !== only) { return; }
      var row = document.querySelector('tr[data-instance="' + change.id + '"]');
      // A new instance (a start elsewhere, a share) needs the page again; an
      // instance that is gone leaves it (its own page says it is gone).
      if (!row) { if (live) { reload(); } return; }
      if (LIFE.terminal.indexOf(change.state) >= 0) { if (!ended(row)) { reload(); } return; }
      // A save that finished made an image: the page lists it (and offers it to start).
      if (live && change.state === "saved" && row.querySelector(".state").dataset.state !== "saved" && !only) { reload(); return; }
      update(row, change);
    };
  }
  source.addEventListener("instance", show(true));
  source.addEventListener("snapshot", show(false));
  // After the snapshot: a row of an instance that no longer stands (it was
  // discarded, or taken back, before the stream started) leaves the page.
  source.addEventListener("snapshot-end", function (message) {
    var standing = JSON.parse(message.data).ids;
    var rows = document.querySelectorAll("tr[data-instance]");
    for (var i = 0; i < rows.length; i++) {
      if (standing.indexOf(rows[i].dataset.instance) < 0 && !ended(rows[i])) { reload(); return; }
    }
  });
  function update(row, change) {
    var state = row.querySelector(".state");
    state.dataset.state = change.state;
    state.textContent = change.state + (change.reason ? ": " : "");
    if (change.reason) {
      // The reason may hold the last lines of the tool's output: keep its lines.
      var reason = document.createElement("pre");
      reason.className = "reason"; reason.textContent = change.reason;
      state.appendChild(reason);
    }
    if (change.idle) {
      // Its catalogue entry's idle limit: when it is stopped (or saved) if nobody uses it meanwhile.
      var idle = document.createElement("small");
      var at = new Date(change.idle.at * 1000);
      idle.className = "idle"; idle.dataset.at = String(change.idle.at);
      idle.textContent = (change.idle.action === "save" ? "Saved" : "Stopped") + " at " +
        at.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}) + " if unused (after " + change.idle.minutes + " min)";
      state.appendChild(document.createElement("br"));
      state.appendChild(idle);
    }
    var url = row.querySelector(".url");
    if (url) {
      url.textContent = "";
      if (change.url && change.state === LIFE.serving) {
        var link = document.createElement("a");
        link.href = change.url; link.textContent = change.url;
        link.target = "_blank"; link.rel = "noopener";
        url.appendChild(link);
      }
    }
    Object.keys(ACTIONS).forEach(function (action) {
      var button = row.querySelector("button." + action);
      if (button) { button.disabled = ACTIONS[action].indexOf(change.state) < 0; }
    });
  }
})();
