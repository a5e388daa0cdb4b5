-- Records the running count in `<prefix>:probe:current`, its maximum in `<prefix>:probe:max`
-- and how often each id ran in the hash `<prefix>:probe:runs` (to count duplicate processing).
local n = redis.call('INCR', KEYS[1])
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > m then redis.call('SET', KEYS[2], n) end
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
return n
