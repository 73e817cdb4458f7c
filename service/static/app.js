// bitplan: live job progress without reloading (polls a small HTML fragment), and the
// latency-table field shown only for a latency budget. Everything works without it too.
(function () {
  "use strict";

  function poll() {
    var block = document.getElementById("progress");
    if (!block || !block.dataset.poll) return;
    var url = block.dataset.poll;
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var holder = document.createElement("div");
        holder.innerHTML = html;
        var fresh = holder.querySelector("#progress");
        if (!fresh) return;
        if (fresh.dataset.state !== "queued" && fresh.dataset.state !== "running") {
          window.location.reload();  // finished: the page now shows the plan or the error
          return;
        }
        block.replaceWith(fresh);
        setTimeout(poll, 1000);
      })
      .catch(function () { setTimeout(poll, 3000); });
  }

  function latencyField() {
    var kind = document.getElementById("budget_kind");
    var field = document.getElementById("latency-field");
    if (!kind || !field) return;
    var sync = function () { field.hidden = kind.value !== "latency_ms"; };
    kind.addEventListener("change", sync);
    sync();
  }

  document.addEventListener("DOMContentLoaded", function () {
    latencyField();
    setTimeout(poll, 1000);
  });
})();
