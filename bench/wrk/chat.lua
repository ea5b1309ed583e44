-- wrk script used for every target alike (so the load generator does the same work for each):
-- POSTs a chat completion, rotating through BENCH_TOKENS user tokens (the same UUID-shaped
-- tokens `loadgen gen-users` creates), and writes its summary as JSON to WRK_OUT.
local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}'
local seed = os.getenv("BENCH_TOKEN_SEED") or "0000beef"
local n = tonumber(os.getenv("BENCH_TOKENS") or "10000")
local reqs = {}
local i = 0

function init(args)
  for k = 0, n - 1 do
    local token = string.format("%s-0000-4000-8000-%012x", seed, k)
    reqs[k + 1] = wrk.format("POST", nil, {
      ["Content-Type"] = "application/json",
      ["Authorization"] = "Bearer " .. token,
    }, body)
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local out = os.getenv("WRK_OUT")
  if out == nil then return end
  local f = io.open(out, "w")
  local e = summary.errors
  f:write(string.format(
    '{"tool":"wrk","requests":%d,"duration_us":%d,"rps":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%.1f,"p90":%.1f,"p99":%.1f,"max":%.1f}}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
  f:close()
end
