-- SETLIMIT(n): set the limit; growth wakes waiters, a shrink revokes nothing.
local n = math.max(0, math.floor(tonumber(ARGV[1])))
local old = limit
redis.call('SET', K_LIMIT, n)
limit = n
local expired = reap()
local grow = n - old
if grow < 0 then grow = 0 end
return {old, wake(grow + expired)}
