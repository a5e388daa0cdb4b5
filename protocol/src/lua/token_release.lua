-- RELEASE(id...): remove the ids; hand freed slots to registered waiters, wake one other
-- waiter per slot left.
local expired = reap()
local removed = 0
for i = 1, #ARGV do removed = removed + redis.call('ZREM', K_LEASES, ARGV[i]) end
local woken, given = 0, 0
if removed + expired > 0 then woken, given = pass_on(removed + expired) end
return {removed, woken, given}
