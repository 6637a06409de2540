// Upload a saved image: the chosen file itself is the body of POST /api/v1/images
// (the browser sends it from disk as it goes, never a form's copy of it), with the
// page's CSRF token; once the portal kept it, the page is loaded again (a GET, so a
// reload sends nothing twice). A refusal is shown as the portal gave it.
(function () {
  "use strict";
  const form = document.getElementById("upload-image");
  if (!form) return;
  const status = document.getElementById("upload-status");
  const button = document.getElementById("upload-button");
  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    const file = document.getElementById("upload-file").files[0];
    if (!file) {
      status.textContent = "Choose the file first.";
      return;
    }
    const params = new URLSearchParams({ filename: file.name });
    const name = document.getElementById("upload-name").value.trim();
    const tool = document.getElementById("upload-tool").value;
    if (name) params.set("name", name);
    if (tool) params.set("tool", tool);
    button.disabled = true;
    status.textContent = "Uploading " + file.name + " …";
    try {
      const response = await fetch("/api/v1/images?" + params.toString(), {
        method: "POST",
        body: file,
        credentials: "same-origin",
        headers: { "Content-Type": "application/x-tar", "X-CSRF-Token": form.dataset.csrf },
      });
      const answer = await response.json().catch(function () { return {}; });
      if (response.status === 201) {
        window.location.assign("/?uploaded=" + encodeURIComponent(answer.id));
        return;
      }
      status.textContent = answer.reason || "The portal answered " + response.status + ".";
    } catch (e) {
      status.textContent = "The upload broke off; try again.";
    }
    button.disabled = false;
  });
})();
