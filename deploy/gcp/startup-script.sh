#!/bin/sh
# GCE startup script for an image with the cluster-node package installed: writes the settings
# and starts the unit named by the instance's `node-role` metadata (scheduler or worker).
# The service account needs compute.instances.list. Add the GCP backend's label flags
# (README, "Flags by backend") as NODE_* lines.
set -eu
md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
role=$(curl -fsS -H 'Metadata-Flavor: Google' "$md/node-role" || echo worker)
cat > /etc/default/cluster-node <<'CONF'
NODE_DISCOVERY=gcp
NODE_PRIVATE_IP_SELECTOR=10.128.0.0/9
NODE_CLUSTER_NAME=prod
CONF
systemctl enable --now "$role"
