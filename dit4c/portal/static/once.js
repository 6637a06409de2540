// A page that shows a secret once (a new password, a new token) is the answer
// to a form. Its entry in the browser's history becomes the page's own
// address, so a reload or a return fetches the page afresh and never sends the
// form again.
(function () {
  "use strict";
  var shown = document.querySelector("[data-shown-once]");
  if (shown && window.history && window.history.replaceState) {
    window.history.replaceState(null, "", shown.getAttribute("data-shown-once"));
  }
})();
