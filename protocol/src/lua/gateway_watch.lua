-- Mark a request watched by a long poll and read its state. KEYS[1] = the result hash.
-- A request that does not exist stays absent (no field is written into nothing).
-- Returns {state, body, error}, as HMGET does.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'watched', '1')
end
return redis.call('HMGET', KEYS[1], 'state', 'body', 'error')
