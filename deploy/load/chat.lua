-- chat.lua - wrk: non-streaming POST /v1/chat/completions, fixed max_tokens and ignore_eos.
--
--   wrk -t2 -c16 -d60s --latency --timeout 120s -s deploy/load/chat.lua http://127.0.0.1:8080
--
-- Every request is the same: one user message, max_tokens MAX_TOKENS, ignore_eos true (so each
-- generates exactly MAX_TOKENS tokens), temperature 0, reasoning off (the whole budget is answer
-- text). wrk waits for whole responses: its latency is end-to-end; for time to first token and
-- inter-token latency use stream_bench.py. At the end the script adds what wrk does not print:
-- responses by status and the tokens the server reported in usage, per second.
--
-- Environment: MAX_TOKENS (16), PROMPT (a short question), MODEL (unset: the served model),
-- THINKING (disabled | enabled; disabled), API_KEY (Bearer, for --api-key servers).

local function json_string(s)
  s = s:gsub('[%c"\\]', function(c)
    local map = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
    return map[c] or string.format("\\u%04x", c:byte())
  end)
  return '"' .. s .. '"'
end

local max_tokens = tonumber(os.getenv("MAX_TOKENS") or "16")
local prompt = os.getenv("PROMPT") or "Explain in one paragraph why the sky is blue."
local model = os.getenv("MODEL")
local thinking = os.getenv("THINKING") or "disabled"
local api_key = os.getenv("API_KEY")

local fields = {
  '"messages":[{"role":"user","content":' .. json_string(prompt) .. '}]',
  '"max_tokens":' .. max_tokens,
  '"ignore_eos":true',
  '"temperature":0',
  '"thinking":{"type":' .. json_string(thinking) .. '}',
}
if model and model ~= "" then
  table.insert(fields, 1, '"model":' .. json_string(model))
end

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = "{" .. table.concat(fields, ",") .. "}"
wrk.headers["Content-Type"] = "application/json"
if api_key and api_key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. api_key
end

-- per-thread counters, collected in done()
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  prompt_tokens = 0
  completion_tokens = 0
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 then
    prompt_tokens = prompt_tokens + tonumber(body:match('"prompt_tokens":%s*(%d+)') or "0")
    completion_tokens = completion_tokens + tonumber(body:match('"completion_tokens":%s*(%d+)') or "0")
  end
end

function done(summary, latency, requests)
  local by_status, p, c = {}, 0, 0
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do
      by_status[k] = (by_status[k] or 0) + v
    end
    p = p + t:get("prompt_tokens")
    c = c + t:get("completion_tokens")
  end
  local secs = summary.duration / 1e6
  local parts = {}
  for k, v in pairs(by_status) do
    table.insert(parts, k .. ": " .. v)
  end
  table.sort(parts)
  io.write(string.format("responses by status: %s\n", table.concat(parts, ", ")))
  io.write(string.format("prompt tokens: %d, completion tokens: %d (%.2f completion tokens/s)\n",
    p, c, c / secs))
  io.write(string.format("latency p50 %.1f ms, p90 %.1f ms, p99 %.1f ms (end to end)\n",
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3))
end
