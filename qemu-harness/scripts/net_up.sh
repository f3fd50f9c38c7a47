#!/bin/sh
# Bring up eth0 on QEMU user networking: guest 10.0.2.15, host loopback is 10.0.2.2.
modprobe virtio_net
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
