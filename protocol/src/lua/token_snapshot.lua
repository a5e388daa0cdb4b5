-- SNAPSHOT(owner or ""): the pool's state, after dropping expired leases.
local expired = reap()
if expired > 0 then wake(expired) end
local reply = status(ARGV[1] or '')
reply[#reply + 1] = redis.call('LLEN', K_WAKE)
local next_expiry = -1
local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
if first[2] then next_expiry = math.max(0, tonumber(first[2]) - now) end
reply[#reply + 1] = next_expiry
return reply
