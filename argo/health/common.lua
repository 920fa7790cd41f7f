-- Argo CD health check for pgbranch.dev/v1alpha1 {{KIND}} (Lua 5.1).
-- Shared rules (every pgbranch kind): deletion in progress -> Progressing,
-- naming the finalizers that hold it; status older than the spec
-- (status.observedGeneration < metadata.generation) -> Progressing;
-- Stalled=True -> Degraded; Ready=True -> Healthy; anything else -> Progressing.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  elseif message ~= "" then
    return message
  elseif reason ~= "" then
    return reason
  end
  return fallback
end

local generation = obj.metadata.generation

if obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  local f = obj.metadata.finalizers
  if f ~= nil and #f > 0 then
    hs.message = "Deleting: waiting on finalizers " .. table.concat(f, ", ")
  else
    hs.message = "Deleting"
  end
  return hs
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the pgbranch operator to report status"
  return hs
end

local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end

local ready = condition("Ready")
local reconciling = condition("Reconciling")
-- A condition written for an older generation says nothing about this one.
if ready ~= nil and generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

