-- vllm-fleet: per-tenant counters of the front door's stick table, served on the stats listener
-- (127.0.0.1 only) as /tenant-metrics for the exporter on this host. One line per tenant:
--   <tenant> http_req_cnt=N,http_req_rate=N,gpc0=N
-- Tenant names only (never keys). The HAProxy CLI is not used for this: at any level that can
-- read a table's entries it can also read maps and the environment.
core.register_service("fleet_tenant_metrics", "http", function(applet)
  local lines = {}
  local tbl = core.backends["vllm_tenants"]
  if tbl ~= nil and tbl.stktable ~= nil then
    for key, data in pairs(tbl.stktable:dump()) do
      local parts = {}
      for name, value in pairs(data) do
        parts[#parts + 1] = name .. "=" .. tostring(value)
      end
      table.sort(parts)
      lines[#lines + 1] = key .. " " .. table.concat(parts, ",")
    end
  end
  table.sort(lines)
  local body = table.concat(lines, "\n") .. "\n"
  applet:set_status(200)
  applet:add_header("content-type", "text/plain")
  applet:add_header("content-length", string.len(body))
  applet:start_response()
  applet:send(body)
end)
