-- Argo CD health of an InternVLService (internvl.ai/v1alpha1).
-- Argo CD runs this with `obj` = the live object and shows the returned status and message.
-- Phases and conditions: operator/internvl_operator/reconcile.py plan_service.
--   condition Ready=True                        -> Healthy (a replica passes /ready)
--   phase Failed (CrashLoopBackOff, OOMKilled,
--     ImagePullBackOff, Unschedulable, ...)     -> Degraded
--   replicas: 0 (Ready reason ScaledToZero)     -> Suspended
--   anything else (loading the model)           -> Progressing
local hs = { status = "Progressing", message = "Waiting for the operator to write status" }
if obj.status == nil then
  return hs
end
local st = obj.status

local ready = nil
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and st.observedGeneration ~= nil and st.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local message = st.message or (ready ~= nil and ready.message) or ""
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
elseif st.phase == "Failed" then
  hs.status = "Degraded"
  if st.failure ~= nil and st.failure.reason ~= nil and not string.find(message, st.failure.reason, 1, true) then
    message = st.failure.reason .. ": " .. message
  end
elseif ready ~= nil and ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
hs.message = message
return hs
