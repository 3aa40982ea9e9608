-- wrk's side of bench/api.py: the same request mix as its Python clients, one connection per client.
-- wrk -t1 -c50 -d20s -s bench/api_load.lua URL -- RUN_ID N_EXAMPLES hot|mixed [THINK_MS]
-- THINK_MS: each connection waits that long between a response and its next request (a dashboard polling);
-- 0 or absent: a closed loop without think time
local run, n, mixed, k, paths, think

function init(args)
  run, n, mixed = args[1], tonumber(args[2]), args[3] == "mixed"
  think = tonumber(args[4] or "0")
  paths = {"/api/v1/runs/" .. run, "/api/v1/runs/" .. run .. "/metrics/loo",
           "/api/v1/runs/" .. run .. "/examples?limit=50", "/api/v1/runs/" .. run .. "/examples/7", "/api/v1/runs"}
  k = 0
end

function delay()
  return think
end

function request()
  k = k + 1
  if mixed and k % 5 == 0 then
    if math.random() < 0.5 then
      return wrk.format("GET", "/api/v1/runs/" .. run .. "/examples/" .. math.random(0, n - 1))
    end
    return wrk.format("GET", "/api/v1/runs/" .. run .. "/examples?limit=50&offset=" .. 50 * math.random(0, n / 50 - 1))
  end
  return wrk.format("GET", paths[k % #paths + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("wrk-result %d %d %d %.3f %.3f\n", summary.requests, e.connect + e.read + e.write + e.timeout,
                         e.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
