#!/usr/bin/env bash
# The real coordinator with 10,000 VMs on one daily schedule: how late is each job started
# after its (jittered) time, and what does the coordinator cost in CPU and memory?
#
#   bash benches/coordinator_scale.sh [VMS] [JITTER_MINUTES]
#
# The coordinator runs as a release build on loopback with its system clock; the VMs are
# protected through the API (10,000 hosts: no agent limit is what is measured), the policy's
# time is set two minutes ahead, and the script waits for every job to start, then reads each
# job's start time against its due time from the API and the process's CPU time and peak
# memory from /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
vms=${1:-10000}
jitter=${2:-1}

cargo build --release --quiet -p cairn-coordinator
exe=target/release/cairn-coordinator
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$exe" serve --db "$work/catalogue.db" --listen "127.0.0.1:$port" \
    --admin-token-file "$work/admin.token" --max-per-host 1 --max-per-datastore 100000 \
    --max-per-vault 100000 >"$work/out" 2>"$work/log" &
pid=$!
until grep -q listening "$work/out" 2>/dev/null; do sleep 0.1; done

python3 - "$port" "$work/admin.token" "$vms" "$jitter" "$pid" <<'EOF'
import datetime, http.client, json, sys, time

port, token_file, vms, jitter, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
token = open(token_file).read().strip()
conn = http.client.HTTPConnection("127.0.0.1", int(port))

def call(method, path, body=None, kind="application/json"):
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = kind
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise SystemExit(f"{method} {path}: {r.status} {data[:200]!r}")
    return json.loads(data)

def cpu_seconds():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0

def peak_rss_mib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0

now = datetime.datetime.now(datetime.timezone.utc)
# Far enough ahead for the protection calls to finish first.
due = (now + datetime.timedelta(minutes=3)).replace(second=0, microsecond=0)
policy = f'''name = "scale"
[schedule]
kind = "daily"
times = ["{due:%H:%M}"]
jitter-minutes = {jitter}
[retention]
keep-daily = 7
'''
call("PUT", "/api/v1/policies/scale", policy, "application/toml")
t = time.time()
for i in range(vms):
    body = json.dumps({"host": f"host-{i}", "datastore": f"ds-{i % 50}", "vault": "main", "policy": "scale"})
    call("PUT", f"/api/v1/vms/vm-{i}", body)
protect_s = time.time() - t
cpu_before, t0 = cpu_seconds(), time.time()
print(f"protected {vms} VMs in {protect_s:.1f} s ({vms / protect_s:.0f}/s); first backup at {due:%H:%M} UTC, jitter {jitter} min")
deadline = due.timestamp() + jitter * 60 + 30
while time.time() < deadline:
    time.sleep(5)
jobs = call("GET", "/api/v1/jobs")["jobs"]
cpu = cpu_seconds() - cpu_before
started = [j for j in jobs if j["started_at"]]
def ts(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
lags = sorted(ts(j["started_at"]) - ts(j["start_at"]) for j in started)
late = [l for l in lags if l > 1.0]
print(f"jobs: {len(jobs)}, started: {len(started)}, queued: {sum(1 for j in jobs if j['state'] == 'queued')}")
if lags:
    p = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]
    print(f"start lag after the due time: median {p(0.5)*1000:.0f} ms, p99 {p(0.99)*1000:.0f} ms, max {lags[-1]*1000:.0f} ms; later than 1 s: {len(late)}")
window = time.time() - t0
print(f"coordinator CPU over the {window:.0f} s from the last protection to the end of dispatch: {cpu:.2f} s ({100 * cpu / window:.1f} % of one core); peak RSS {peak_rss_mib():.0f} MiB")
if len(started) != vms or late:
    raise SystemExit("not every job started within 1 s of its time")
EOF
