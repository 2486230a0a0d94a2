-- wrk script: POST /api/messaging/send-otp naming one number, for a new user id from a new
-- client address on every request (a flood of codes to one phone, SMS bombing): after the
-- number's first codes of the hour every answer is a refusal (429) by that number's limit.
counter = 0
local thread_id = 0
function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end
request = function()
  counter = counter + 1
  local n = (tid or 0) * 10000000 + counter
  local body = string.format('{"user_id":"bomb-%d","phone_number":"+919800000002","purpose":"login"}', n)
  local ip = string.format("198.19.%d.%d", math.floor(n / 256) % 256, n % 256)
  return wrk.format("POST", "/api/messaging/send-otp", {["Content-Type"] = "application/json", ["X-Forwarded-For"] = ip}, body)
end
