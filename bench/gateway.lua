-- wrk script for bench/gateway.sh: POSTs the JSON body in $WRK_BODY to the
-- URL given on the command line and, when done, prints one line
-- "WRK_JSON {...}" with requests, seconds, errors and latency percentiles
-- (microseconds), which bench/gateway_report.py reads.
wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY")
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, "latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "p99.9": %d, "max": %d}}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max))
end
