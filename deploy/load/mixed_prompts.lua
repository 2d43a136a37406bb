-- mixed_prompts.lua - wrk: non-streaming POST /v1/completions with a mix of prompt lengths.
--
--   wrk -t2 -c16 -d60s --latency --timeout 300s -s deploy/load/mixed_prompts.lua \
--     http://127.0.0.1:8080
--
-- Each request's prompt is a list of token ids (exact lengths, no tokenizer in the way) whose
-- length is drawn from PROMPT_LENS with PROMPT_WEIGHTS, from a fixed per-thread seed, so runs
-- repeat. Generation is fixed (MAX_TOKENS, ignore_eos, temperature 0), so the mix exercises
-- chunked prefill next to decode: short requests queued behind long prefills show up in the
-- latency tail. Each length has VARIANTS different prompts (built once in init). At the end it
-- prints responses by status and the prompt / completion tokens per second the server reported.
--
-- Environment: PROMPT_LENS ("16,64,256,1024"), PROMPT_WEIGHTS ("4,3,2,1"), MAX_TOKENS (16),
-- VARIANTS (8), SEED (1), MODEL (unset: the served model), API_KEY (Bearer).
-- Keep max(PROMPT_LENS) + MAX_TOKENS within the server's --max-model-len.

local function list(s)
  local t = {}
  for x in string.gmatch(s, "[^,%s]+") do
    table.insert(t, tonumber(x))
  end
  return t
end

local lens = list(os.getenv("PROMPT_LENS") or "16,64,256,1024")
local weights = list(os.getenv("PROMPT_WEIGHTS") or "4,3,2,1")
local max_tokens = tonumber(os.getenv("MAX_TOKENS") or "16")
local variants = tonumber(os.getenv("VARIANTS") or "8")
local seed = tonumber(os.getenv("SEED") or "1")
local model = os.getenv("MODEL")
local api_key = os.getenv("API_KEY")
assert(#lens == #weights, "PROMPT_LENS and PROMPT_WEIGHTS need the same number of entries")

wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
if api_key and api_key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. api_key
end

local threads = {}
local next_id = 0
function setup(thread)
  next_id = next_id + 1
  thread:set("thread_id", next_id)
  table.insert(threads, thread)
end

-- a small LCG: deterministic across LuaJIT / Lua versions (math.random is not)
local state
local function rand()
  state = (state * 1103515245 + 12345) % 2147483648
  return state
end

function init(args)
  state = (seed * 7919 + thread_id * 104729) % 2147483648
  statuses, prompt_tokens, completion_tokens = {}, 0, 0
  local head = '{' .. ((model and model ~= "") and ('"model":"' .. model .. '",') or '')
  bodies = {}
  for i, n in ipairs(lens) do
    bodies[i] = {}
    for v = 1, variants do
      local ids = {}
      for k = 1, n do
        ids[k] = 1000 + rand() % 99000
      end
      bodies[i][v] = head .. '"prompt":[' .. table.concat(ids, ",") .. '],"max_tokens":' ..
        max_tokens .. ',"ignore_eos":true,"temperature":0}'
    end
  end
  total_weight = 0
  for _, w in ipairs(weights) do
    total_weight = total_weight + w
  end
end

function request()
  local r = rand() % total_weight
  local i = 1
  while r >= weights[i] do
    r = r - weights[i]
    i = i + 1
  end
  local body = bodies[i][1 + rand() % variants]
  return wrk.format(nil, nil, nil, body)
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
  io.write(string.format("prompt tokens: %d (%.1f/s), completion tokens: %d (%.2f/s)\n",
    p, p / secs, c, c / secs))
  io.write(string.format("latency p50 %.1f ms, p90 %.1f ms, p99 %.1f ms (end to end)\n",
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3))
end
