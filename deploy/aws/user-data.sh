#!/bin/sh
# EC2 launch template user data: configures and starts a worker from the cluster-node package
# (baked into the AMI, or installed here). The instance profile needs ec2:DescribeInstances.
# Add the AWS backend's tag flags (README, "Flags by backend") as NODE_* lines.
set -eu
[ -x /usr/bin/cluster-node ] || apt-get install -y /opt/cluster-node.deb
cat > /etc/default/cluster-node <<'CONF'
NODE_DISCOVERY=aws
NODE_PRIVATE_IP_SELECTOR=10.0.0.0/16
NODE_CLUSTER_NAME=prod
CONF
systemctl enable --now worker
