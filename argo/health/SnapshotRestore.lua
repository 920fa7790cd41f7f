-- The phase is the restore's own state machine; it decides before Ready.
local phase = obj.status.phase
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(stalled, describe(ready, "Restore failed"))
  return hs
end
if phase == "AwaitingFinalize" then
  -- Multi-step restore: the restored data is up for preview and waits for a
  -- person to set spec.finalize: true. Suspended, like a paused rollout.
  hs.status = "Suspended"
  local restored = obj.status.restoredBranch or "its own branch"
  local target = "the target"
  if obj.spec ~= nil and obj.spec.target ~= nil then
    target = obj.spec.target
  end
  hs.message = "Restored data is up as " .. restored .. " for preview; set spec.finalize: true to move " .. target .. " onto it"
  return hs
end
if phase == "Completed" then
  hs.status = "Healthy"
  local msg = "Restore completed"
  if obj.status.backupBranch ~= nil then
    msg = msg .. "; previous data kept as branch " .. obj.status.backupBranch
  end
  hs.message = msg
  return hs
end
if phase == "Pending" or phase == "Restoring" or phase == "Finalizing" then
  hs.status = "Progressing"
  local detail = obj.status.progress
  if detail == nil or detail == "" then
    if ready ~= nil and ready.message ~= nil then
      detail = ready.message
    else
      detail = ""
    end
  end
  hs.message = phase
  if detail ~= "" then
    hs.message = phase .. ": " .. detail
  end
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "{{KIND}} is ready")
  return hs
end

hs.status = "Progressing"
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = describe(reconciling, "Reconciling")
else
  hs.message = describe(ready, "Waiting for {{KIND}} to become ready")
end
return hs
