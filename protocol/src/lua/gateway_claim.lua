-- Claim `id` as pending unless a request with that id exists. KEYS[1] = result hash.
-- ARGV[1] = reservation ttl ms. Returns the existing state, or "" when newly claimed.
local s = redis.call('HGET', KEYS[1], 'state')
if s then return s end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'state', 'pending', 'at', t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return ''
