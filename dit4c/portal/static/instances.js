// Live instance states: the portal pushes each change as a Server-Sent Event,
// and this updates the row in place, so a start can be watched without reloading.
(function () {
  "use strict";
  if (!window.EventSource) { return; }
  var ACTIONS = {
    stop: ["requested", "starting", "running"],
    save: ["running"],
    discard: ["stopped", "saved", "errored"]
  };
  var source = new EventSource("/events");
  source.addEventListener("instance", function (message) {
    var change = JSON.parse(message.data);
    var row = document.querySelector('tr[data-instance="' + change.id + '"]');
    if (!row) { window.location.reload(); return; }
    var state = row.querySelector(".state");
    state.dataset.state = change.state;
    state.textContent = change.state + (change.reason ? ": " + change.reason : "");
    var url = row.querySelector(".url");
    if (url) {
      url.textContent = "";
      if (change.url && change.state === "running") {
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
  });
})();
