// Self-refresh: every element with data-refresh="N" is re-fetched from the same URL every N seconds
// and replaced in place, unless the user is typing in a form inside it or the tab is hidden.
(function () {
  "use strict";
  function busy(el) {
    var active = document.activeElement;
    return document.hidden || (active && active !== document.body && el.contains(active) && active.form);
  }
  function schedule(el) {
    var seconds = parseFloat(el.getAttribute("data-refresh"));
    if (!(seconds > 0)) { return; }
    setTimeout(function () { refresh(el.id); }, seconds * 1000);
  }
  function refresh(id) {
    var el = document.getElementById(id);
    if (!el) { return; }
    if (busy(el)) { schedule(el); return; }
    var url = window.location.pathname + window.location.search.replace(/([?&])msg=[^&]*&?/, "$1");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById(id);
        if (!fresh) { return; }
        el.replaceWith(fresh);
        schedule(fresh);
      })
      .catch(function () { schedule(el); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh][id]").forEach(schedule);
  });
})();
