if obj.spec ~= nil and obj.spec.suspend == true and (ready == nil or ready.status == "True") then
  hs.status = "Suspended"
  hs.message = "Schedule suspended: no new snapshots (retention still prunes)"
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
