-- wrk script: valid ONe callbacks with unique eventIds, round-robin over the three types.
--
--   wrk -t2 -c64 -d10s -s tests/bench/callbacks.lua \
--       http://127.0.0.1:8080/one/klient/events -- klient one dev-password [TAG]
--
-- Script arguments (after `--`): tenant, Basic user, Basic password, and an optional TAG of up
-- to 8 hex digits that makes the eventIds of this invocation differ from any other's (run.py
-- passes a fresh one per wrk run; the default is derived from the clock). An eventId is
-- TAG-<thread>-4<type>..-8000-<counter>: unique across threads and, with distinct tags, across
-- invocations, so the bridge's duplicate window never swallows one.
--
-- The bodies are in the platform's wire shape (bridge/sender.py callback_body: Jackson-style
-- pretty printing, two-space indent, `" : "` separators, no trailing newline), 216-269 bytes.
--
-- At the end it prints one line `BENCH_JSON {...}` for run.py: requests, ok (2xx), non2xx and
-- the non-2xx statuses, wrk's socket errors, latency percentiles in microseconds, and the mean
-- body size. `ok` is counted by response() per request (exact), not derived from
-- summary.errors.status (which only counts statuses > 399).

local TYPES = { "CartOpened", "ClientLogged", "OfferOpened" }
-- The id fields each type carries, in wire order (bridge/sender.py ID_FIELDS).
local ID_FIELDS = {
  CartOpened = { "cartId", "clientId" },
  ClientLogged = { "clientId" },
  OfferOpened = { "offerId", "clientId" },
}

local threads = {}
local next_thread_id = 0

-- Main (setup/done) environment: number the threads and keep them for done().
function setup(thread)
  next_thread_id = next_thread_id + 1
  thread:set("thread_id", next_thread_id)
  table.insert(threads, thread)
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(text)
  local out = {}
  for i = 1, #text, 3 do
    local a, b, c = text:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local chars = {}
    for shift = 3, 0, -1 do
      local index = math.floor(n / 64 ^ shift) % 64
      chars[#chars + 1] = B64:sub(index + 1, index + 1)
    end
    if not b then
      chars[3], chars[4] = "=", "="
    elseif not c then
      chars[4] = "="
    end
    out[#out + 1] = table.concat(chars)
  end
  return table.concat(out)
end

-- Per-thread state (each wrk thread runs init/request/response in its own Lua state).
local tenant, tag, headers
counter = 0
ok_count = 0
non2xx_count = 0
body_bytes_total = 0
statuses = {}

function init(args)
  tenant = args[1] or "klient"
  local user = args[2] or "one"
  local password = args[3] or "dev-password"
  tag = args[4] or string.format("%08x", os.time() % 4294967296)
  tag = string.sub(string.rep("0", 8) .. tag, -8)
  headers = {
    ["Authorization"] = "Basic " .. base64(user .. ":" .. password),
    ["Content-Type"] = "application/json",
    ["Accept"] = "application/json, application/cbor, application/*+json",
    ["one-tenant"] = tenant,
  }
end

local function uuid_like(kind, n)
  -- TAG-TTTT-4K00-8000-CCCCCCCCCCCC: the tag, the thread, the field kind, the counter.
  return string.format("%s-%04x-4%x00-8000-%012x", tag, thread_id or 0, kind, n)
end

function request()
  counter = counter + 1
  local event_type = TYPES[(counter - 1) % 3 + 1]
  local lines = {
    '{\n  "type" : "' .. event_type .. '"',
    '  "tenantKey" : "' .. tenant .. '"',
  }
  for kind, field in ipairs(ID_FIELDS[event_type]) do
    local value = uuid_like(kind, counter)
    if field == "clientId" then
      value = "org:" .. value
    end
    lines[#lines + 1] = '  "' .. field .. '" : "' .. value .. '"'
  end
  lines[#lines + 1] = '  "eventId" : "' .. uuid_like(0, counter) .. '"'
  lines[#lines + 1] = '  "timestamp" : "'
    .. os.date("!%Y-%m-%dT%H:%M:%S", os.time())
    .. string.format(".%06dZ", counter % 1000000)
    .. '"\n}'
  local body = table.concat(lines, ",\n")
  body_bytes_total = body_bytes_total + #body
  return wrk.format("POST", nil, headers, body)
end

function response(status, _headers, _body)
  if status >= 200 and status < 300 then
    ok_count = ok_count + 1
  else
    non2xx_count = non2xx_count + 1
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, _requests)
  local ok, non2xx, sent, body_bytes = 0, 0, 0, 0
  local by_status = {}
  for _, thread in ipairs(threads) do
    ok = ok + (thread:get("ok_count") or 0)
    non2xx = non2xx + (thread:get("non2xx_count") or 0)
    body_bytes = body_bytes + (thread:get("body_bytes_total") or 0)
    sent = sent + (thread:get("counter") or 0)
    for status, count in pairs(thread:get("statuses") or {}) do
      by_status[status] = (by_status[status] or 0) + count
    end
  end
  local status_parts = {}
  for status, count in pairs(by_status) do
    status_parts[#status_parts + 1] = string.format('"%d":%d', status, count)
  end
  local errors = summary.errors
  io.write(
    string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"ok":%d,"non2xx":%d,"statuses":{%s},'
        .. '"requests_built":%d,"body_bytes_mean":%.1f,"bytes_received":%d,'
        .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
        .. '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
      summary.requests,
      summary.duration,
      ok,
      non2xx,
      table.concat(status_parts, ","),
      sent,
      sent > 0 and body_bytes / sent or 0,
      summary.bytes,
      errors.connect,
      errors.read,
      errors.write,
      errors.status,
      errors.timeout,
      latency.mean,
      latency:percentile(50.0),
      latency:percentile(90.0),
      latency:percentile(99.0),
      latency:percentile(99.9),
      latency.max
    )
  )
end
