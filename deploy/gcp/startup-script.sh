#!/bin/sh
# GCE startup script for a cluster node: installs the cluster-node package if the image lacks
# it (which brings /usr/bin/cluster-node and the scheduler/worker units), writes its settings
# from the instance's metadata, and starts the unit that `node-role` names. Runs at every boot.
#
# Instance metadata (attributes):
#   node-role      scheduler | worker (default worker); also the unit, so
#                  `journalctl -n10000 --unit=worker | grep "^ *Member"` works
#   node-package   gs://BUCKET/cluster-node.deb, https://... or a path on the image (only if
#                  the image lacks the package)
#   node-cluster-key  the cluster key file's content (`cluster-node keygen`, one key per line),
#                  written to /etc/cluster-node/key (0600), which the units load as their
#                  `cluster-key` credential; without it the node runs keyless. Metadata is
#                  readable by every process on the VM: prefer Secret Manager where that matters.
#   node-settings  NODE_* lines for /etc/default/cluster-node, e.g.
#                  NODE_GCP_LABELS=cluster=prod
#                  NODE_PRIVATE_IP_SELECTOR=10.128.0.0/9
# The project and the zone default to the metadata server's; the service account needs
# compute.instances.list (deploy/gcp/discovery-role.yaml) and the compute-ro scope.
set -eu
md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
attr() { curl -fsS -H 'Metadata-Flavor: Google' "$md/$1" 2>/dev/null || true; }

role=$(attr node-role)
role=${role:-worker}
case "$role" in
  scheduler|worker) ;;
  *) echo "node-role must be scheduler or worker, not '$role'" >&2; exit 1 ;;
esac

if [ ! -x /usr/bin/cluster-node ]; then
  pkg=$(attr node-package)
  tmp=/tmp/cluster-node.deb
  case "$pkg" in
    gs://*) gcloud storage cp "$pkg" "$tmp" ;;
    https://*) curl -fsSL --retry 5 -o "$tmp" "$pkg" ;;
    /*) cp "$pkg" "$tmp" ;;
    *) echo "the image has no cluster-node: set node-package to gs://..., https://... or a path" >&2; exit 1 ;;
  esac
  apt-get install -y "$tmp"
  rm -f "$tmp"
fi

key=$(attr node-cluster-key)
if [ -n "$key" ]; then
  install -d -m 0755 /etc/cluster-node
  (umask 077; printf '%s\n' "$key" > /etc/cluster-node/key)
fi

{
  echo "NODE_DISCOVERY=gcp"
  attr node-settings
  echo
} > /etc/default/cluster-node
systemctl enable "$role"
systemctl restart "$role"
