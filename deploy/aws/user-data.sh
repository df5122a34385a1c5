#!/bin/sh
# EC2 launch-template user data: installs the cluster-node package (binary, scheduler and
# worker units), writes /etc/default/cluster-node from the variables below and enables the unit
# ROLE names, so every instance launched from the template finds its peers by tag. cloud-init
# runs it once, at the first boot; the enabled unit comes back at every later boot.
#
# Edit the variables in the launch template. The instance profile needs the policy in
# deploy/aws/iam-policy.json (ec2:DescribeInstances only); the region is read from IMDSv2.
#
# The cluster key (optional; without it traffic is unauthenticated):
#   CLUSTER_KEY=...              the key file's content (`cluster-node keygen`), inline. User
#                                data is readable by every process on the instance through
#                                IMDS, so use this only where that is acceptable.
#   CLUSTER_KEY_PARAMETER=/path  an SSM SecureString parameter holding it, read with the aws
#                                CLI (the profile then also needs ssm:GetParameter and
#                                kms:Decrypt on its key).
# Either way it lands in /etc/cluster-node/key (0600), which the units load as the
# `cluster-key` credential.
set -eu

ROLE=worker                        # or scheduler; also the unit's name
CLUSTER_TAGS="cluster=prod"        # the tags this template puts on its instances
CLUSTER_NAME=prod
PRIVATE_IP_SELECTOR=10.0.0.0/16    # the VPC (or subnet) CIDR
PRIVATE_PORT=8081
PACKAGE="https://artifacts.example.internal/cluster-start/cluster-node_0.1.0_amd64.deb"
PACKAGE_SHA256=""                  # checked when set
CLUSTER_KEY=""
CLUSTER_KEY_PARAMETER=""
EXTRA_SETTINGS=""                  # more NODE_* lines for /etc/default/cluster-node

case "$ROLE" in
  scheduler|worker) ;;
  *) echo "ROLE must be scheduler or worker, not '$ROLE'" >&2; exit 1 ;;
esac

deb=/var/tmp/cluster-node.deb
case "$PACKAGE" in
  http://*|https://*) curl -fsSL --retry 5 -o "$deb" "$PACKAGE" ;;
  /*) cp "$PACKAGE" "$deb" ;;
  *) echo "PACKAGE must be an http(s) URL or a path, not '$PACKAGE'" >&2; exit 1 ;;
esac
if [ -n "$PACKAGE_SHA256" ]; then
  echo "$PACKAGE_SHA256  $deb" | sha256sum -c -
fi
apt-get install -y "$deb"
rm -f "$deb"

if [ -n "$CLUSTER_KEY_PARAMETER" ]; then
  CLUSTER_KEY=$(aws ssm get-parameter --with-decryption --name "$CLUSTER_KEY_PARAMETER" \
    --query Parameter.Value --output text)
fi
if [ -n "$CLUSTER_KEY" ]; then
  install -d -m 0755 /etc/cluster-node
  (umask 077; printf '%s\n' "$CLUSTER_KEY" > /etc/cluster-node/key)
fi

cat > /etc/default/cluster-node <<ENV
NODE_DISCOVERY=aws
NODE_AWS_TAGS=$CLUSTER_TAGS
NODE_CLUSTER_NAME=$CLUSTER_NAME
NODE_PRIVATE_IP_SELECTOR=$PRIVATE_IP_SELECTOR
NODE_PRIVATE_PORT=$PRIVATE_PORT
$EXTRA_SETTINGS
ENV

# The packaged unit is named after the role, so operators can run
# journalctl -n10000 --unit=worker | grep "^ *Member"
systemctl enable --now "$ROLE.service"
