-- Moves every message of a dead worker's processing list back onto the source's consuming end.
-- KEYS[1] = processing list, KEYS[2] = source list. Returns how many were moved.
local n = 0
while true do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not v then break end
  n = n + 1
end
return n
