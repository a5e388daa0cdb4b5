-- Shared by every token script (prepended to each): key names, server time, the limit, and the
-- helpers reap, wake, share and status. MAX_WAKE, STARVING_MS and SHARE_TURN_MS are defined
-- before this by the Rust code (protocol/src/tokens.rs), so each constant is written once.
local K_LIMIT, K_LEASES, K_WAKE, K_OWNERS, K_STARVING = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_WAITERS, K_GRANTED = KEYS[6], KEYS[7]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- ARGV[1] of every token script is the limit the caller saw last ('' if none). It stands in
-- only while the key is missing, i.e. after Redis lost its data and before the operator's next
-- poll writes it again: a missing limit must not read as 0 and stop every worker. Removed here,
-- so each script's own arguments start at ARGV[1].
local last_seen = tonumber(table.remove(ARGV, 1))
local limit = 0
do
  local raw = redis.call('GET', K_LIMIT)
  if raw then
    limit = math.max(0, math.floor(tonumber(raw) or 0))
  elseif last_seen then
    limit = math.max(0, math.floor(last_seen))
  end
end

-- Drop expired leases and marks, waiters that stopped waiting, and hand-offs whose lease is
-- gone (nobody took them in time); return how many leases expired.
local function reap()
  redis.call('ZREMRANGEBYSCORE', K_OWNERS, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', K_STARVING, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', K_WAITERS, '-inf', now)
  local expired = redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', now)
  if expired > 0 then
    local pending = redis.call('LRANGE', K_GRANTED, 0, -1)
    for i = 1, #pending do
      local _, id = string.match(pending[i], '^(%d+) (.+)$')
      if not (id and redis.call('ZSCORE', K_LEASES, id)) then
        redis.call('LREM', K_GRANTED, 1, pending[i])
      end
    end
  end
  return expired
end

-- A waiter's member of `waiters`: its TTL, its owner (length-prefixed: owners are free-form)
-- and its ticket, the name of the lease a hand-off makes (unique: made by the caller).
local function waiter(ttl, owner, ticket)
  return ttl .. ' ' .. #owner .. ' ' .. owner .. ticket
end

-- Hand up to n freed slots, never more than the free capacity, straight to registered
-- waiters (soonest to stop waiting first): each becomes a lease named by the waiter's ticket
-- with the waiter's TTL, pushed to `granted` as '<ttl_ms> <id>', where the blocked waiters pop
-- it. The owner got what it waited for, so it is no longer starving. Return how many were
-- handed off.
local function hand_off(n)
  local given = 0
  while given < n and limit - redis.call('ZCARD', K_LEASES) > 0 do
    local w = redis.call('ZPOPMIN', K_WAITERS)
    if not w[1] then break end
    local ttl, len, rest = string.match(w[1], '^(%d+) (%d+) (.*)$')
    if rest then
      local owner, id = string.sub(rest, 1, tonumber(len)), string.sub(rest, tonumber(len) + 1)
      redis.call('ZADD', K_LEASES, now + tonumber(ttl), id)
      redis.call('ZREM', K_STARVING, owner)
      redis.call('RPUSH', K_GRANTED, ttl .. ' ' .. id)
      given = given + 1
    end
  end
  return given
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

-- The fair share of `owner`: the limit split over the interested owners so that the shares add
-- up to the limit. (A share of ceil(limit / owners) each does not: with a limit of 4 and three
-- owners, two holding 2 each leave the third nothing, for good.) The `limit mod owners` owners
-- that get one more are taken in name order from a starting point that moves on every
-- SHARE_TURN_MS, so that with fewer leases than owners every owner gets its turn. For '' (an
-- observer), the largest share.
local function share(owner)
  local n = redis.call('ZCARD', K_OWNERS)
  if n == 0 then return limit end
  local base, extra = math.floor(limit / n), limit % n
  if extra == 0 then return base end
  if owner == '' then return base + 1 end
  local names = redis.call('ZRANGE', K_OWNERS, 0, -1)
  table.sort(names)
  local rank = 0
  for i = 1, #names do
    if names[i] == owner then rank = i - 1 end
  end
  if (rank + math.floor(now / SHARE_TURN_MS)) % n < extra then return base + 1 end
  return base
end

-- {limit, in_use, owners, starving owners other than `owner`, share of `owner`}
local function status(owner)
  local starving = redis.call('ZCARD', K_STARVING)
  if owner ~= '' and redis.call('ZSCORE', K_STARVING, owner) then starving = starving - 1 end
  return {limit, redis.call('ZCARD', K_LEASES), redis.call('ZCARD', K_OWNERS), starving, share(owner)}
end

-- Pass n freed slots on: to registered waiters first, a wake-up for each one left. Return
-- {woken, handed_off}.
local function pass_on(n)
  local given = hand_off(n)
  return wake(n - given), given
end
