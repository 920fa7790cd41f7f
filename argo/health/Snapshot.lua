if ready ~= nil and ready.status == "True" and obj.status.readyToUse ~= true then
  hs.status = "Progressing"
  hs.message = "{{KIND}} taken but not yet ready to use"
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
