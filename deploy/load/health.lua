-- health.lua - wrk: GET /health (the HTTP layer alone: no model, no engine).
--
--   wrk -t2 -c64 -d10s --latency -s deploy/load/health.lua http://127.0.0.1:8080
--
-- bench_http.sh runs it next to nginx serving a static file of the same size.
wrk.method = "GET"
wrk.path = "/health"
wrk.headers["Connection"] = "keep-alive"

local statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  io.write(string.format("requests/s: %.0f\n", summary.requests / (summary.duration / 1e6)))
end
