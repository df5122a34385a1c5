#!/bin/bash
# GCE startup script for a cluster node: installs the `node` binary and a systemd unit whose
# flags come from the instance's metadata, then starts it. Runs at every boot, as root.
#
# Instance metadata (attributes) it reads:
#   node-binary    where to fetch the binary: gs://BUCKET/PATH (gcloud storage) or https://...
#   node-role      scheduler | worker (also the unit name, so `journalctl --unit=worker` works)
#   node-flags     extra flags, e.g. "--gcp_labels=cluster=prod --private_ip_selector=10.128.0.0/9"
# Discovery defaults need no metadata: the project and the zone come from the metadata server.
set -euo pipefail

md() {
  curl -fsS -H 'Metadata-Flavor: Google' \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" 2>/dev/null || true
}

role="$(md node-role)"
role="${role:-worker}"
case "$role" in
  scheduler|worker) ;;
  *) echo "node-role must be scheduler or worker, not '$role'" >&2; exit 1 ;;
esac
binary="$(md node-binary)"
flags="$(md node-flags)"

if [ -z "$binary" ]; then
  echo "set the node-binary metadata attribute to gs://BUCKET/node or an https:// URL" >&2
  exit 1
fi

tmp="$(mktemp)"
case "$binary" in
  gs://*) gcloud storage cp "$binary" "$tmp" ;;
  https://*) curl -fsSL --retry 5 -o "$tmp" "$binary" ;;
  *) echo "node-binary must start with gs:// or https://" >&2; exit 1 ;;
esac
install -m 0755 "$tmp" /usr/local/bin/node
rm -f "$tmp"

id -u node >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin node

# Every flag is also a NODE_* variable; the unit passes the metadata-driven ones on the
# command line and keeps them visible in `systemctl cat`.
cat >"/etc/systemd/system/${role}.service" <<UNIT
[Unit]
Description=cluster ${role}
Wants=network-online.target
After=network-online.target

[Service]
User=node
ExecStart=/usr/local/bin/node --role ${role} --discovery gcp ${flags}
Restart=always
RestartSec=2
# Member lists are multi-line records; journald keeps each as one entry.
StandardError=journal
Environment=RUST_LOG=info

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable "${role}.service"
systemctl restart "${role}.service"
