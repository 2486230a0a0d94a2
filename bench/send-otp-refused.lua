-- wrk script: POST /api/messaging/send-otp for one user and number, over and over: after the first
-- sends of the hour every answer is a refusal (429, rate limited), which is what this measures.
request = function()
  return wrk.format("POST", "/api/messaging/send-otp",
    {["Content-Type"] = "application/json", ["X-Forwarded-For"] = "198.18.0.1"},
    '{"user_id":"bench-refused","phone_number":"+919800000001","purpose":"login"}')
end
