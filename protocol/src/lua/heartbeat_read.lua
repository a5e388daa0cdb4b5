-- Reads the workers' counters in one script call and prunes heartbeats of long-dead replicas.
-- KEYS: processed, failed, heartbeats, rates, inflight. ARGV[1] = fresh window ms,
-- ARGV[2] = prune after ms.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[2]))
for _, w in ipairs(dead) do
  redis.call('ZREM', KEYS[3], w)
  redis.call('HDEL', KEYS[4], w)
  redis.call('HDEL', KEYS[5], w)
end
local live = redis.call('ZRANGEBYSCORE', KEYS[3], now - tonumber(ARGV[1]), '+inf')
local rate, inflight = 0, 0
for _, w in ipairs(live) do
  rate = rate + tonumber(redis.call('HGET', KEYS[4], w) or '0')
  inflight = inflight + tonumber(redis.call('HGET', KEYS[5], w) or '0')
end
return {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2]) or '0', #live,
        tostring(rate), inflight}
