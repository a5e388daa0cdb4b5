-- ACQUIRE(owner, k, ttl_ms, held, id_prefix, first): grant up to k leases, named id_prefix
-- followed by first, first + 1, ... The caller makes the names unique (a random prefix per
-- process and a local counter), so no state kept here can hand out a name twice, even after
-- Redis lost data. See the module docs for the reply.
local owner, k, ttl, held = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4] or '0')
local id_prefix, first = ARGV[5], tonumber(ARGV[6])
local expired = reap()
redis.call('ZADD', K_OWNERS, now + math.max(ttl, STARVING_MS), owner)
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
local ids = {}
if g > 0 then
  for i = 1, g do
    local id = id_prefix .. string.format('%d', first + i - 1)
    ids[i] = id
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
if g == 0 then
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
