#!/bin/sh
# EC2 launch-template user data: installs the node binary and a systemd unit whose flags come
# from this template, so every instance launched from it finds its peers by tag.
#
# Edit the variables below in the launch template. The instance profile needs the policy in
# deploy/aws/iam-policy.json (ec2:DescribeInstances only); the region is read from IMDSv2.
set -eu

ROLE=worker                        # or scheduler
CLUSTER_TAGS="cluster=prod"        # the tags this template puts on its instances
CLUSTER_NAME=prod
PRIVATE_IP_SELECTOR=10.0.0.0/16    # the VPC (or subnet) CIDR
PRIVATE_PORT=8081
BINARY_URL="https://artifacts.example.internal/cluster-start/node-x86_64-linux"
BINARY_SHA256="replace-with-the-release-sha256"

install -d -m 0755 /usr/local/bin
curl -fsSL --retry 5 -o /usr/local/bin/node.download "$BINARY_URL"
echo "$BINARY_SHA256  /usr/local/bin/node.download" | sha256sum -c -
install -m 0755 /usr/local/bin/node.download /usr/local/bin/cluster-node
rm -f /usr/local/bin/node.download

id -u cluster >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin cluster

cat > /etc/default/cluster-node <<ENV
NODE_ROLE=$ROLE
NODE_DISCOVERY=aws
NODE_AWS_TAGS=$CLUSTER_TAGS
NODE_CLUSTER_NAME=$CLUSTER_NAME
NODE_PRIVATE_IP_SELECTOR=$PRIVATE_IP_SELECTOR
NODE_PRIVATE_PORT=$PRIVATE_PORT
ENV

# The unit is named after the role, so operators can run
# journalctl -n10000 --unit=worker | grep "^ *Member"
cat > /etc/systemd/system/$ROLE.service <<'UNIT'
[Unit]
Description=cluster-start node
Wants=network-online.target
After=network-online.target

[Service]
User=cluster
EnvironmentFile=/etc/default/cluster-node
ExecStart=/usr/local/bin/cluster-node
Restart=always
RestartSec=2
# SIGTERM makes the node leave both clusters before it exits.
KillSignal=SIGTERM
TimeoutStopSec=10
AmbientCapabilities=CAP_NET_BIND_SERVICE
NoNewPrivileges=true

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable --now "$ROLE.service"
