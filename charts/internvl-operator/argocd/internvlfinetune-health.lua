-- Argo CD health of an InternVLFineTune (internvl.ai/v1alpha1).
-- Argo CD runs this with `obj` = the live object and shows the returned status and message.
-- Phases and conditions: operator/internvl_operator/constants.py and reconcile.py.
--   Succeeded, or Serving once the Complete condition is True  -> Healthy
--   Failed (phase, or condition Failed=True)                    -> Degraded
--   Suspended                                                   -> Suspended
--   anything else (Pending, Validating, Training, Merging)      -> Progressing
local hs = { status = "Progressing", message = "Waiting for the operator to write status" }
if obj.status == nil then
  return hs
end
local st = obj.status

local function condition(kind)
  if st.conditions == nil then
    return nil
  end
  for _, c in ipairs(st.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- Status written for an older spec says nothing about the current one (the user just edited it).
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and st.observedGeneration ~= nil and st.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local message = st.message or ""
local failed = condition("Failed")
local complete = condition("Complete")
if st.phase == "Failed" or (failed ~= nil and failed.status == "True") then
  hs.status = "Degraded"
  if message == "" and failed ~= nil then
    message = failed.message or failed.reason or ""
  end
  hs.message = message
  return hs
end
if st.phase == "Succeeded" or (st.phase == "Serving" and complete ~= nil and complete.status == "True") then
  hs.status = "Healthy"
  hs.message = message
  return hs
end
if st.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
  return hs
end

-- Progressing: say where the run is, with training progress when there is some.
local text = st.phase or "Pending"
if st.progress ~= nil and st.progress.summary ~= nil then
  text = text .. " " .. st.progress.summary
  if st.progress.loss ~= nil then
    text = text .. " loss " .. tostring(st.progress.loss)
  end
end
if message ~= "" then
  text = text .. ": " .. message
end
hs.message = text
return hs
