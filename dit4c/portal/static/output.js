// The tool's output on an instance's page: its last part at once, then what
// it writes, asked of the portal's API every two seconds while "Follow" is on.
(function () {
  "use strict";
  var box = document.getElementById("output");
  if (!box || !window.fetch) { return; }
  var api = "/api/v1/instances/" + encodeURIComponent(box.dataset.instance) + "/logs";
  var said = document.getElementById("output-error");
  var following = document.getElementById("follow-output");
  var KEEP = 200000;  // characters shown; the download has more
  var offset = null;
  var busy = false;
  function ask() {
    if (busy || (offset !== null && following && !following.checked)) { return; }
    busy = true;
    fetch(api + (offset === null ? "" : "?offset=" + offset), {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) { return response.json(); })
      .then(function (piece) {
        said.textContent = piece.error || "";
        if (piece.next !== undefined) { offset = piece.next; }
        if (piece.text) {
          var atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
          var text = box.textContent + piece.text;
          box.textContent = text.length > KEEP ? text.slice(text.length - KEEP) : text;
          if (atEnd) { box.scrollTop = box.scrollHeight; }
        }
        box.dataset.offset = String(offset);
      })
      .catch(function () { said.textContent = "The portal did not answer; trying again."; })
      .then(function () { busy = false; });
  }
  ask();
  setInterval(ask, 2000);
})();
