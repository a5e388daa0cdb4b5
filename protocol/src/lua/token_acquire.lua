-- ACQUIRE(owner, k, ttl_ms, held, id_prefix, first, wait_ms, done_ticket): grant up to k
-- leases, named id_prefix followed by first, first + 1, ... The caller makes the names unique
-- (a random prefix per process and a local counter), so no state kept here can hand out a
-- name twice, even after Redis lost data. When nothing is granted and the caller will block
-- for wait_ms (> 0), it registers as a waiter under the ticket id_prefix .. (first + k), the
-- name a RELEASE gives the lease it hands over. done_ticket ('' if none) is the caller's
-- previous ticket, no longer waiting. See the module docs for the reply.
local owner, k, ttl, held = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4] or '0')
local id_prefix, first = ARGV[5], tonumber(ARGV[6])
local wait_ms, done_ticket = tonumber(ARGV[7] or '0'), ARGV[8] or ''
local expired = reap()
if done_ticket ~= '' then redis.call('ZREM', K_WAITERS, waiter(ttl, owner, done_ticket)) end
redis.call('ZADD', K_OWNERS, now + math.max(ttl, STARVING_MS), owner)
-- Hand-offs that no blocked waiter took (it was cancelled or had just timed out) go to the
-- next caller first: they are leases already, counted in in_use.
local ids = {}
local adopted = redis.call('LPOP', K_GRANTED, k)
if adopted then
  for i = 1, #adopted do
    -- reap() dropped hand-offs whose lease expired; the check only guards the invariant.
    local _, id = string.match(adopted[i], '^(%d+) (.+)$')
    if id and redis.call('ZSCORE', K_LEASES, id) then
      redis.call('ZADD', K_LEASES, 'XX', now + ttl, id)
      ids[#ids + 1] = id
    end
  end
  k = k - #ids
end
local in_use = redis.call('ZCARD', K_LEASES)
local g = math.max(0, math.min(k, limit - in_use))
-- Fair share: while another owner starves, nobody grows beyond its share.
local held_back = false
local before = status(owner)
if before[4] > 0 then
  local room = math.max(0, before[5] - held)
  if room < g then
    g = room
    held_back = true
  end
end
if g > 0 then
  for i = 1, g do
    local id = id_prefix .. string.format('%d', first + i - 1)
    ids[#ids + 1] = id
    redis.call('ZADD', K_LEASES, now + ttl, id)
  end
end
if g < k then
  redis.call('ZADD', K_STARVING, now + STARVING_MS, owner)
else
  redis.call('ZREM', K_STARVING, owner)
end
-- Wake others for capacity that expired, and pass on the wake-up this caller may have used
-- but may not act on. This also trims stale wake-ups to the capacity left, so that a waiter's
-- BLPOP really blocks when nothing is free.
local pass = expired
if held_back then pass = pass + 1 end
wake(pass)
local wait = 0
if #ids == 0 then
  if not held_back and wait_ms > 0 then
    local ticket = id_prefix .. string.format('%d', first + tonumber(ARGV[2]))
    redis.call('ZADD', K_WAITERS, now + wait_ms + WAITER_SLACK_MS, waiter(ttl, owner, ticket))
  end
  if held_back then
    wait = -2
  else
    wait = -1
    local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
    if first[2] then wait = math.max(1, tonumber(first[2]) - now) end
  end
end
local reply = status(owner)
table.insert(reply, 1, wait)
for i = 1, #ids do reply[#reply + 1] = ids[i] end
return reply
