#!/bin/bash
# Example: the service account, IAM role and instance templates for one cluster on GCE.
# Read it, set the variables, then run it (or copy the commands). Needs gcloud, logged in.
#
#   PROJECT=my-project REGION=us-central1 CLUSTER=prod PACKAGE=gs://my-bucket/cluster-node.deb \
#     bash deploy/gcp/instance-template.sh
set -euo pipefail

: "${PROJECT:?set PROJECT}"
: "${REGION:?set REGION, e.g. us-central1}"
: "${CLUSTER:?set CLUSTER, the value of the cluster label}"
: "${PACKAGE:?set PACKAGE, gs://BUCKET/cluster-node.deb}"
NETWORK_CIDR="${NETWORK_CIDR:-10.128.0.0/9}"   # the subnet range(s) the nodes' NICs are in
SA_NAME="${SA_NAME:-cluster-node}"
SA="${SA_NAME}@${PROJECT}.iam.gserviceaccount.com"
here="$(cd "$(dirname "$0")" && pwd)"

# 1. A service account with only the discovery permission (compute.instances.list).
gcloud iam service-accounts create "$SA_NAME" --project "$PROJECT" \
  --display-name "cluster node" || true
gcloud iam roles create clusterDiscovery --project "$PROJECT" \
  --file "$here/discovery-role.yaml" || true
gcloud projects add-iam-policy-binding "$PROJECT" \
  --member "serviceAccount:$SA" \
  --role "projects/$PROJECT/roles/clusterDiscovery"

# 2. The node settings, as NODE_* lines (README, "Flags by backend").
settings="$(mktemp)"
cat >"$settings" <<CONF
NODE_GCP_REGION=${REGION}
NODE_GCP_LABELS=cluster=${CLUSTER}
NODE_PRIVATE_IP_SELECTOR=${NETWORK_CIDR}
NODE_CLUSTER_NAME=${CLUSTER}
CONF

# 3. One template per role. Discovery finds every RUNNING instance labelled cluster=$CLUSTER
#    in the region's zones; the compute-ro scope is the narrowest that allows listing.
for role in scheduler worker; do
  gcloud compute instance-templates create "${CLUSTER}-${role}" \
    --project "$PROJECT" \
    --machine-type e2-small \
    --image-family debian-12 --image-project debian-cloud \
    --service-account "$SA" \
    --scopes compute-ro,logging-write,storage-ro \
    --labels "cluster=${CLUSTER},role=${role}" \
    --tags "${CLUSTER}-node" \
    --metadata "node-role=${role},node-package=${PACKAGE}" \
    --metadata-from-file "node-settings=$settings,startup-script=$here/startup-script.sh"
done

# 4. Firewall: the internal API and both clusters (UDP and TCP) between nodes of the cluster.
gcloud compute firewall-rules create "${CLUSTER}-gossip" --project "$PROJECT" \
  --source-tags "${CLUSTER}-node" --target-tags "${CLUSTER}-node" \
  --allow tcp:8081,tcp:9081,udp:9081,tcp:10081,udp:10081 || true

echo "templates ${CLUSTER}-scheduler and ${CLUSTER}-worker created; start VMs or managed instance groups from them"
