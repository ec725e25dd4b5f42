#!/usr/bin/env bash
# Installs what optbin needs on Debian 12 (idempotent; skips apt when all is present):
# fuse3 (fusermount3), LLVM BOLT (bolt-19 and bolt-22 where the archive has them), perf,
# gcc (tests compile real C programs), util-linux (setpriv, runuser), redis-server and
# redis-tools (the fleet tests start their own Redis servers and a Redis Cluster),
# chromium (the HTML report is checked in a headless browser), curl (the metrics endpoint),
# acl (setfacl: the mount's tests give real directories POSIX ACLs)
# and openssl (the TLS tests make their own certificate authority; optbin's own TLS is
# rustls, built in).
set -euo pipefail
need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v perf >/dev/null || need+=(linux-perf)
command -v gcc >/dev/null || need+=(gcc)
command -v setpriv >/dev/null || need+=(util-linux)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v openssl >/dev/null || need+=(openssl)
command -v setfacl >/dev/null || need+=(acl)
command -v chromium >/dev/null || need+=(chromium)
command -v curl >/dev/null || need+=(curl)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
ls /usr/lib/llvm-*/bin/llvm-bolt >/dev/null 2>&1 || need+=(bolt)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "optbin: need root to install: ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
pkgs=()
for p in "${need[@]}"; do
  if [ "$p" = bolt ]; then
    # Both versions where available: optbin detects the newest and supports 19 and 22.
    for b in bolt-22 bolt-19; do
      apt-cache show "$b" >/dev/null 2>&1 && pkgs+=("$b")
    done
  else
    pkgs+=("$p")
  fi
done
apt-get install -y -qq "${pkgs[@]}" >/dev/null
echo "optbin: installed ${pkgs[*]}"
