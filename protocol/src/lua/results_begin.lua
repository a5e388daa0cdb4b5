-- Mark each id `processing` unless it already finished. KEYS: the result hashes.
-- ARGV[1] = ttl ms. Returns one entry per id: 1 = run it, 0 = already finished (skip).
local ttl = ARGV[1]
local t = redis.call('TIME')
-- A string, formatted once: a number would be formatted again by every call it is passed to.
local now = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
local out = {}
for i, key in ipairs(KEYS) do
  local s = redis.call('HGET', key, 'state')
  if s == 'done' or s == 'failed' then
    out[i] = 0
  else
    redis.call('HSET', key, 'state', 'processing', 'at', now)
    redis.call('PEXPIRE', key, ttl)
    out[i] = 1
  end
end
return out
