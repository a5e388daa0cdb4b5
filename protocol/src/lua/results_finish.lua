-- Finish each id once. KEYS[1] = processed counter, KEYS[2] = failed counter,
-- KEYS[3..] = result hashes. ARGV[1] = ttl ms, ARGV[2] = channel, ARGV[3] = 'PUBLISH' or
-- 'SPUBLISH' (sharded, on a cluster), then per id: outcome ('done'|'failed'), payload (body or
-- error), id. The id is announced on the channel only when a long poll watches it.
-- Returns one entry per id: 1 = written, 0 = was already finished.
local ttl = ARGV[1]
local channel = ARGV[2]
local publish = ARGV[3]
local t = redis.call('TIME')
local now = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
local done, failed = 0, 0
local out = {}
for i = 3, #KEYS do
  local key = KEYS[i]
  local base = 4 + (i - 3) * 3
  local outcome, payload, id = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  -- One read for both fields: this runs for every message.
  local f = redis.call('HMGET', key, 'state', 'watched')
  local s = f[1]
  if s == 'done' or s == 'failed' then
    out[i - 2] = 0
  else
    if outcome == 'done' then
      -- No HDEL of 'error': only a finished (failed) request has one, and those are skipped.
      redis.call('HSET', key, 'state', 'done', 'body', payload, 'at', now)
      done = done + 1
    else
      redis.call('HSET', key, 'state', 'failed', 'error', payload, 'at', now)
      failed = failed + 1
    end
    redis.call('PEXPIRE', key, ttl)
    if f[2] then
      redis.call(publish, channel, id)
    end
    out[i - 2] = 1
  end
end
if done > 0 then redis.call('INCRBY', KEYS[1], done) end
if failed > 0 then redis.call('INCRBY', KEYS[2], failed) end
return out
