-- Workers whose heartbeat is older than ARGV[1] ms (Redis server time), removed from the set.
-- KEYS[1] = heartbeats.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
return dead
