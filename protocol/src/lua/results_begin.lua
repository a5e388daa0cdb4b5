-- Mark each id `processing` unless it already finished, and count its deliveries.
-- KEYS: the result hashes. ARGV[1] = ttl ms.
-- Returns one entry per id: 0 = already finished (skip), else how many times it has been
-- started (1 the first time): a count that keeps growing means the message takes the worker
-- down each time (a poison message), and the worker dead-letters it.
local ttl = ARGV[1]
local t = redis.call('TIME')
-- A string, formatted once: a number would be formatted again by every call it is passed to.
local now = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
-- Three commands per id (read both fields at once, write all three): Redis runs this for every
-- message, and each call from Lua costs about as much as the work it does.
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'state', 'deliveries')
  local s = f[1]
  if s == 'done' or s == 'failed' then
    out[i] = 0
  else
    local n = (tonumber(f[2]) or 0) + 1
    redis.call('HSET', key, 'state', 'processing', 'at', now, 'deliveries', n)
    out[i] = n
    redis.call('PEXPIRE', key, ttl)
  end
end
return out
