-- The annotators of worker/bench_load.py, as a wrk script:
--
--   wrk -s worker/load.lua URL -- MODE ROUND_ID THREADS KEYS ITEMS CLASSES
--
-- MODE: healthz (GET /healthz), queries (GET /queries/ROUND_ID) or labels (POST /labels, one
-- label per request). KEYS, ITEMS and CLASSES are comma-separated API keys, item ids and
-- class names; THREADS is wrk's -t. Every response's status is counted, and done() prints
-- one line, "wrk-report {...}", with the counts, the latency percentiles and wrk's errors.
--
-- POST /labels walks over every (item, annotator) pair; each thread takes every THREADS-th
-- request, so no two threads ever send the same pair. A pair comes round again only after
-- #ITEMS * #KEYS requests, each time with the next class, so each answer differs from the
-- pair's previous one and every 2xx inserts a label ("created":1), none is a repeat.

local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

local function split(text)
   local parts = {}
   for part in string.gmatch(text, "[^,]+") do
      table.insert(parts, part)
   end
   return parts
end

function init(args)
   mode, round_id, thread_count = args[1], args[2], tonumber(args[3])
   keys, items, classes = split(args[4]), split(args[5]), split(args[6])
   sent, s2xx, s3xx, s4xx, s5xx, other, created = 0, 0, 0, 0, 0, 0, 0
   prepared = {}
   if mode == "healthz" then
      prepared[1] = wrk.format("GET", "/healthz")
   elseif mode == "queries" then
      for i, key in ipairs(keys) do
         prepared[i] = wrk.format("GET", "/queries/" .. round_id, {Authorization = "Bearer " .. key})
      end
   elseif mode ~= "labels" then
      error("unknown mode " .. tostring(mode))
   end
end

local function label(n)
   local pairs_count = #items * #keys
   local pair, visit = n % pairs_count, math.floor(n / pairs_count)
   local item = items[pair % #items + 1]
   local key = keys[math.floor(pair / #items) + 1]
   local value = classes[(visit + pair) % #classes + 1]
   local body = string.format(
      '{"item_id":%s,"value":"%s","round_id":%s}', item, value, round_id)
   return wrk.format("POST", "/labels", {
      Authorization = "Bearer " .. key,
      ["Content-Type"] = "application/json",
   }, body)
end

function request()
   local n = sent * thread_count + thread_index  -- this request's number over all threads
   sent = sent + 1
   if mode == "labels" then
      return label(n)
   end
   return prepared[n % #prepared + 1]
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      s2xx = s2xx + 1
      if mode == "labels" and string.find(body, '"created":1', 1, true) then
         created = created + 1
      end
   elseif status >= 300 and status < 400 then
      s3xx = s3xx + 1
   elseif status >= 400 and status < 500 then
      s4xx = s4xx + 1
   elseif status >= 500 and status < 600 then
      s5xx = s5xx + 1
   else
      other = other + 1
   end
end

function done(summary, latency, requests)
   local total = {s2xx = 0, s3xx = 0, s4xx = 0, s5xx = 0, other = 0, created = 0, sent = 0}
   for _, thread in ipairs(threads) do
      for name, _ in pairs(total) do
         total[name] = total[name] + thread:get(name)
      end
   end
   local e = summary.errors
   io.write(string.format(
      'wrk-report {"requests":%d,"sent":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},' ..
      '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d},' ..
      '"status":{"2xx":%d,"3xx":%d,"4xx":%d,"5xx":%d,"other":%d},"created":%d}\n',
      summary.requests, total.sent, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.timeout, e.status,
      latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max,
      total.s2xx, total.s3xx, total.s4xx, total.s5xx, total.other, total.created))
end
