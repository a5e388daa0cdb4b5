-- WITHDRAW(owner, ttl_ms, ticket): a waiter that stops waiting (cancelled, or handed another
-- waiter's lease) drops its registration and the hand-off made to it that nobody popped; the
-- slot so freed goes to the next waiter. A hand-off already popped belongs to its popper.
local owner, ttl, ticket = ARGV[1], ARGV[2], ARGV[3]
local expired = reap()
redis.call('ZREM', K_WAITERS, waiter(ttl, owner, ticket))
local freed = 0
if redis.call('LREM', K_GRANTED, 1, ttl .. ' ' .. ticket) > 0 then
  freed = redis.call('ZREM', K_LEASES, ticket)
end
local woken, given = 0, 0
if freed + expired > 0 then woken, given = pass_on(freed + expired) end
return {freed, woken, given}
