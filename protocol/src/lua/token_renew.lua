-- RENEW(owner, ttl_ms, id...): extend the ids still present, report the lost ones.
local owner, ttl = ARGV[1], tonumber(ARGV[2])
local expired = reap()
local lost = {}
local kept = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', K_LEASES, id) then
    redis.call('ZADD', K_LEASES, 'XX', now + ttl, id)
    kept = kept + 1
  else
    lost[#lost + 1] = id
  end
end
if kept > 0 then redis.call('ZADD', K_OWNERS, now + math.max(ttl, STARVING_MS), owner) end
if expired > 0 then wake(expired) end
local reply = status(owner)
for i = 1, #lost do reply[#reply + 1] = lost[i] end
return reply
