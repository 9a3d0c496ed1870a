-- wrk script for the bench: every request has the target and Host given after `--`,
-- so wrk can speak to a forward proxy in absolute form:
--   wrk ... http://127.0.0.1:PROXY/ -- http://127.0.0.1:ORIGIN/ 127.0.0.1:ORIGIN
-- (or, straight at the origin, `-- / 127.0.0.1:ORIGIN`). The request stays static, so wrk
-- builds it once. done() prints one JSON line prefixed with "BENCH " for bench/measure.py.

function init(args)
  wrk.path = args[1]
  wrk.headers["Host"] = args[2]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
      .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
