-- RELEASE(id...): remove the ids and wake one waiter per freed slot.
local expired = reap()
local removed = 0
for i = 1, #ARGV do removed = removed + redis.call('ZREM', K_LEASES, ARGV[i]) end
local woken = 0
if removed + expired > 0 then woken = wake(removed + expired) end
return {removed, woken}
