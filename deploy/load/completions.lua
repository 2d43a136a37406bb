-- completions.lua - wrk: non-streaming POST /v1/completions, fixed max_tokens, ignore_eos.
--
--   MAX_TOKENS=1  wrk -t2 -c16 -d20s --latency --timeout 60s -s deploy/load/completions.lua URL
--   MAX_TOKENS=16 wrk -t2 -c16 -d20s --latency --timeout 60s -s deploy/load/completions.lua URL
--
-- Every request sends the same 8 token ids as the prompt (no tokenizer work, a fixed prefill)
-- and asks for exactly MAX_TOKENS tokens (ignore_eos, temperature 0), so requests/s times
-- MAX_TOKENS is the generation rate. wrk measures whole responses: for time to first token and
-- inter-token latency use stream_bench.py. Prints non-200 responses separately (a 503 means
-- the queue was full: lower -c or raise --max-queue).
--
-- Environment: MAX_TOKENS (16), API_KEY (Bearer, for --api-key servers).
local max_tokens = tonumber(os.getenv("MAX_TOKENS") or "16")
wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("API_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = string.format(
  '{"prompt": [100, 200, 300, 400, 500, 600, 700, 800], "max_tokens": %d, ' ..
  '"ignore_eos": true, "temperature": 0}', max_tokens)

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bad = 0
end

function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local nbad = 0
  for _, t in ipairs(threads) do
    nbad = nbad + (t:get("bad") or 0)
  end
  local secs = summary.duration / 1e6
  io.write(string.format("max_tokens %d: %.1f requests/s, %.1f generated tokens/s, non-200: %d\n",
    max_tokens, summary.requests / secs, summary.requests * max_tokens / secs, nbad))
end
