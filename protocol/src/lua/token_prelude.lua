-- Shared by every token script (prepended to each): key names, server time, the limit, and the
-- helpers reap, wake and status. MAX_WAKE and STARVING_MS are defined before this by the Rust
-- code (protocol/src/tokens.rs), so each constant is written once.
local K_LIMIT, K_LEASES, K_WAKE, K_SEQ, K_OWNERS, K_STARVING =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = 0
do
  local raw = redis.call('GET', K_LIMIT)
  if raw then limit = math.max(0, math.floor(tonumber(raw) or 0)) end
end

-- Drop expired leases and marks; return how many leases expired.
local function reap()
  redis.call('ZREMRANGEBYSCORE', K_OWNERS, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', K_STARVING, '-inf', now)
  return redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', now)
end

-- Push up to n wake-ups, never more than the free capacity, and trim the list to it.
local function wake(n)
  local free = limit - redis.call('ZCARD', K_LEASES)
  if free <= 0 then
    redis.call('DEL', K_WAKE)
    return 0
  end
  if free > MAX_WAKE then free = MAX_WAKE end
  if n > free then n = free end
  if n > 0 then
    local tokens = {}
    for i = 1, n do tokens[i] = '1' end
    redis.call('LPUSH', K_WAKE, unpack(tokens))
  end
  redis.call('LTRIM', K_WAKE, 0, free - 1)
  return n
end

-- {limit, in_use, owners, starving owners other than `owner`}
local function status(owner)
  local starving = redis.call('ZCARD', K_STARVING)
  if owner ~= '' and redis.call('ZSCORE', K_STARVING, owner) then starving = starving - 1 end
  return {limit, redis.call('ZCARD', K_LEASES), redis.call('ZCARD', K_OWNERS), starving}
end
